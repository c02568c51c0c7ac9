//! What can go wrong setting up a container that a caller may want to tell apart. Returned
//! inside `anyhow::Error` (`e.downcast_ref::<RuntimeError>()`).

/// A container setup failure.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// An option value that is wrong (`--memory 0`, `--cap-add BOGUS`...).
    #[error("{option} '{value}': {reason}")]
    BadOption {
        /// The option as the user wrote it.
        option: String,
        /// Its value.
        value: String,
        /// What is wanted.
        reason: String,
    },
    /// A capability name no kernel has.
    #[error("unknown capability '{0}'")]
    UnknownCapability(String),
    /// A path that must be absolute (working directory, volume target).
    #[error("{what} '{path}' must be {}", if *what == "working directory" { "absolute" } else { "an absolute path" })]
    NotAbsolute {
        /// "working directory" or "volume target".
        what: &'static str,
        /// As given.
        path: String,
    },
    /// An empty command line.
    #[error("no command to run")]
    NoCommand,
    /// `--user NAME` that the image's /etc/passwd lacks.
    #[error("unable to find user {0}: no matching entries in /etc/passwd")]
    UnknownUser(String),
    /// A resource limit that cannot be set here (rootless, a controller missing).
    #[error("{0}")]
    Cgroup(String),
    /// A seccomp profile strata cannot compile, or no filter for this machine.
    #[error("{0}")]
    Seccomp(String),
    /// The rootless user namespace could not be set up.
    #[error("{0}")]
    UserNamespace(String),
}

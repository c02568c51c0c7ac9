//! What can go wrong in a build that a caller may want to tell apart. The builder returns
//! these inside `anyhow::Error` (match with `downcast_ref::<BuildError>()` on the error or
//! on any link of its chain); a failure inside a step is the cause, and
//! [`BuildError::At`] (the Dockerfile line) its context, so the printed message reads
//! `Dockerfile:LINE: INSTRUCTION: why`.

/// A build failure.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The Dockerfile (or an ONBUILD trigger) does not parse, or is not a build.
    #[error("{file}{}: {reason}", place(*line, *column))]
    Syntax {
        /// The Dockerfile's name as given.
        file: String,
        /// 1-based line (0 when the whole file is meant).
        line: usize,
        /// 1-based column, when the parser says.
        column: Option<usize>,
        /// What was expected.
        reason: String,
    },
    /// The step a failure happened in: the context of the error below it.
    #[error("{file}:{line}: {text}")]
    At {
        /// The Dockerfile's name as given.
        file: String,
        /// 1-based line of the instruction.
        line: usize,
        /// The instruction as written.
        text: String,
    },
    /// A RUN whose command exited non-zero (or was killed).
    #[error("the command returned a non-zero code: {code}")]
    RunFailed {
        /// Its exit code (128+N for signal N).
        code: i32,
    },
    /// A flag or form strata does not support.
    #[error("{0}")]
    Unsupported(String),
    /// An instruction's arguments are wrong (bad mode, port, empty command...).
    #[error("{0}")]
    Invalid(String),
    /// A COPY/ADD source that climbs out of the context.
    #[error("'{0}' is outside the build context")]
    OutsideContext(String),
    /// A COPY/ADD source that is not in the context.
    #[error("'{0}' not found in the build context")]
    SourceNotFound(String),
    /// A source `.dockerignore` excludes.
    #[error("'{0}' is excluded by .dockerignore")]
    Excluded(String),
    /// A glob that matches nothing.
    #[error("no file in the context matches '{0}'")]
    NoMatch(String),
    /// A context source when the Dockerfile came from standard input.
    #[error("'{0}': there is no build context (the Dockerfile came from standard input)")]
    NoContext(String),
    /// `--target` names no stage of the Dockerfile.
    #[error("--target '{name}': no stage of that name in {file}")]
    NoStage {
        /// As given.
        name: String,
        /// The Dockerfile's name as given.
        file: String,
    },
    /// Stopped by a signal (Ctrl-C); what the build made is cleaned up.
    #[error("interrupted by signal {0}")]
    Interrupted(i32),
}

/// `:LINE[:COLUMN]`, or nothing for the whole file.
fn place(line: usize, column: Option<usize>) -> String {
    match (line, column) {
        (0, _) => String::new(),
        (l, None) => format!(":{l}"),
        (l, Some(c)) => format!(":{l}:{c}"),
    }
}

impl BuildError {
    /// The first `BuildError` in `e`'s chain that is not the step context.
    pub fn cause_of(e: &anyhow::Error) -> Option<&BuildError> {
        e.chain()
            .filter_map(|c| c.downcast_ref::<BuildError>())
            .find(|b| !matches!(b, BuildError::At { .. }))
    }
}

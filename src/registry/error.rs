//! What can go wrong talking to a registry that a caller may want to tell apart. Returned
//! inside `anyhow::Error` (`e.downcast_ref::<RegistryError>()`); each message names the
//! reference or host it is about.

/// A registry failure.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// No connection (refused, no route, no name) or no answer in time.
    #[error("cannot reach registry {domain}{detail}")]
    Unreachable {
        /// The registry host.
        domain: String,
        /// Why, starting with its own separator (": ..." or " over HTTPS: ...").
        detail: String,
    },
    /// HTTPS failed where plain HTTP got an answer: the certificate is the problem.
    #[error(
        "cannot reach registry {domain} over HTTPS: {reason} (trust its CA with --cert-dir DIR \
         holding ca.crt, or skip verification with --tls-verify=false)"
    )]
    Certificate {
        /// The registry host.
        domain: String,
        /// What TLS said.
        reason: String,
    },
    /// A request that needs credentials, or whose credentials were refused.
    #[error(
        "{what}: {domain} requires authentication or refused the credentials (run `strata login {domain}`)"
    )]
    Unauthorized {
        /// The reference or blob asked for.
        what: String,
        /// The registry host.
        domain: String,
    },
    /// The registry refused access for another reason it gave (denied, insufficient scope).
    #[error("{what}: {detail}")]
    Denied {
        /// The reference asked for.
        what: String,
        /// The registry's words.
        detail: String,
    },
    /// The bearer token service refused or failed (401/403: the credentials).
    #[error("{domain}: the token service answered HTTP {code}")]
    TokenService {
        /// The registry host.
        domain: String,
        /// The status.
        code: u16,
    },
    /// `login` with a wrong user name or password.
    #[error("login to {domain}: wrong user name or password (the registry refused them)")]
    LoginRefused {
        /// The registry host.
        domain: String,
    },
    /// `logout` from a registry with no stored credentials.
    #[error("not logged in to {0}")]
    NotLoggedIn(String),
    /// No such repository, tag, digest or blob.
    #[error("{what}: {detail}")]
    NotFound {
        /// The reference or blob asked for.
        what: String,
        /// What the registry said.
        detail: String,
    },
    /// Any other HTTP answer.
    #[error("{what}: {domain} answered HTTP {code}{}", if message.is_empty() { String::new() } else { format!(": {message}") })]
    Http {
        /// The reference or blob asked for.
        what: String,
        /// The registry host.
        domain: String,
        /// The status.
        code: u16,
        /// The registry's message, if any.
        message: String,
    },
    /// The registry took longer than `STRATA_REGISTRY_TIMEOUT` to answer.
    #[error("{what}: {domain} did not answer within {after:?} (STRATA_REGISTRY_TIMEOUT)")]
    Timeout {
        /// The reference or blob asked for.
        what: String,
        /// The registry host.
        domain: String,
        /// The limit.
        after: std::time::Duration,
    },
    /// A manifest or blob larger than strata accepts.
    #[error("{what}: {detail}")]
    TooLarge {
        /// The reference or blob.
        what: String,
        /// Sizes.
        detail: String,
    },
    /// Content that does not hash to the digest it was asked by (nothing is stored).
    #[error("{what}: {detail}")]
    DigestMismatch {
        /// The reference or blob.
        what: String,
        /// The digests.
        detail: String,
    },
    /// A download that kept ending early.
    #[error("{what}: the registry sent {got} of {want} bytes")]
    Truncated {
        /// The blob.
        what: String,
        /// Bytes received.
        got: u64,
        /// Bytes announced.
        want: u64,
    },
    /// No image for the asked platform in an index.
    #[error("{what}: no image for platform {platform} (the index has: {have})")]
    NoPlatform {
        /// The reference.
        what: String,
        /// The platform asked for.
        platform: String,
        /// Those the index has.
        have: String,
    },
    /// Something strata does not speak (schema 1, a media type, an auth scheme, client
    /// certificates).
    #[error("{0}")]
    Unsupported(String),
    /// Any other failure, in words.
    #[error("{what}: {detail}")]
    Other {
        /// The reference, blob or host.
        what: String,
        /// What happened.
        detail: String,
    },
}

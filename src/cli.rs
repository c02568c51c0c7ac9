//! Command-line definitions (clap). The help text here is also the source of the man pages.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// strata: a FUSE overlay filesystem compatible with kernel overlayfs, and a container-image
/// layer toolkit.
#[derive(Debug, Parser)]
#[command(name = "strata", version, about, long_about = None)]
pub struct Cli {
    /// More log output (-v info, -vv debug, -vvv trace), given before the command;
    /// RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Image store directory (default: /var/lib/strata as root, else $XDG_DATA_HOME/strata).
    #[arg(long, global = true, env = "STRATA_ROOT", value_name = "DIR")]
    pub root: Option<PathBuf>,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// The verbs.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Mount an overlay of lower layers under a writable upper directory.
    Mount(MountArgs),
    /// Unmount a strata mount and wait for its daemon to finish.
    Umount(UmountArgs),
    /// Turn an upper directory into a new image layer.
    Commit(CommitArgs),
    /// Show the changes of an upper directory (A/C/D), or between two images.
    Diff(DiffArgs),
    /// Show the layers of an image.
    History(HistoryArgs),
    /// List images.
    Images(ImagesArgs),
    /// Give an image another name.
    Tag(TagArgs),
    /// Remove image names; unreferenced data goes with the last one.
    Rmi(RmiArgs),
    /// Show an image's manifest and config as JSON.
    Inspect(InspectArgs),
    /// Remove blobs and unpacked layers no image refers to.
    Gc,
    /// Verify the store: every image's blobs present with their digests and sizes.
    Check(CheckArgs),
    /// Write images to an archive that docker, podman, skopeo and umoci load.
    Save(SaveArgs),
    /// Load images from a docker or OCI archive.
    Load(LoadArgs),
    /// Make a one-layer image from a flat rootfs tar.
    Import(ImportArgs),
    /// Build an image from a Dockerfile and a context directory.
    Build(BuildArgs),
    /// Fetch an image from a registry (docker's references: alpine = docker.io/library/alpine).
    Pull(PullArgs),
    /// Send an image to a registry.
    Push(PushArgs),
    /// Check and store credentials for a registry.
    Login(LoginArgs),
    /// Remove stored credentials for a registry.
    Logout(LogoutArgs),
    /// Write an image's flattened tree as one tar.
    Export(ExportArgs),
    /// Create a container: a named working copy of an image.
    Create(CreateArgs),
    /// List containers.
    Ps(PsArgs),
    /// Remove containers.
    Rm(RmArgs),
    /// Run a command in a new container.
    Run(RunArgs),
    /// Run a command (default: a shell) in an existing container.
    Shell(ShellArgs),
}

/// `strata create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Container name (default: generated).
    #[arg(long)]
    pub name: Option<String>,
    /// The image.
    pub image: String,
}

/// `strata ps`.
#[derive(Debug, Args)]
pub struct PsArgs {
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    pub format: Format,
}

/// `strata rm`.
#[derive(Debug, Args)]
pub struct RmArgs {
    /// Remove even while mounted or running (stops the process, unmounts).
    #[arg(short = 'f', long)]
    pub force: bool,
    /// Containers.
    #[arg(required = true)]
    pub containers: Vec<String>,
}

/// How a process is run (shared by `run` and `shell`).
#[derive(Debug, Args, Clone)]
pub struct ProcessArgs {
    /// Keep standard input open.
    #[arg(short = 'i', long)]
    pub interactive: bool,
    /// Allocate a pseudo-terminal.
    #[arg(short = 't', long)]
    pub tty: bool,
    /// Set an environment variable (KEY=VALUE, or KEY to copy it from here); repeatable.
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Working directory in the container.
    #[arg(short = 'w', long = "workdir", value_name = "DIR")]
    pub workdir: Option<String>,
    /// User (name, uid, user:group or uid:gid).
    #[arg(short = 'u', long)]
    pub user: Option<String>,
    /// Bind-mount a host path: HOST:CONTAINER[:ro]; repeatable.
    #[arg(short = 'v', long = "volume", value_name = "HOST:CTR[:ro]")]
    pub volume: Vec<String>,
    /// Network: none (a fresh loopback only) or host.
    #[arg(long, default_value = "none", value_parser = ["none", "host"])]
    pub network: String,
    /// Security options: seccomp=unconfined (no seccomp filter; the default is docker's
    /// default profile), seccomp=FILE (a docker seccomp profile in JSON),
    /// no-new-privileges; repeatable.
    #[arg(long = "security-opt", value_name = "OPT")]
    pub security_opt: Vec<String>,
    /// Add a capability to docker's default set (e.g. NET_ADMIN, or ALL); repeatable.
    #[arg(long = "cap-add", value_name = "CAP")]
    pub cap_add: Vec<String>,
    /// Drop a capability from the set (e.g. CHOWN, or ALL); repeatable.
    #[arg(long = "cap-drop", value_name = "CAP")]
    pub cap_drop: Vec<String>,
    /// Every capability and no seccomp filter (devices stay the minimal set).
    #[arg(long)]
    pub privileged: bool,
    /// Mount the container's root read-only (volumes and /dev stay writable).
    #[arg(long)]
    pub read_only: bool,
    /// Memory limit (e.g. 512m, 1g), through cgroups (root only).
    #[arg(short = 'm', long, value_name = "SIZE")]
    pub memory: Option<String>,
    /// Limit on processes and threads in the container (cgroups; root only).
    #[arg(long, value_name = "N")]
    pub pids_limit: Option<u64>,
    /// CPU limit in CPUs (e.g. 0.5), through cgroups (root only).
    #[arg(long, value_name = "N")]
    pub cpus: Option<f64>,
    /// Hostname (default: the container name).
    #[arg(long)]
    pub hostname: Option<String>,
}

/// `strata run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Remove the container when the command ends.
    #[arg(long)]
    pub rm: bool,
    /// Container name (default: generated).
    #[arg(long)]
    pub name: Option<String>,
    /// Process options.
    #[command(flatten)]
    pub process: ProcessArgs,
    /// Override the image's ENTRYPOINT ('' clears it); the command follows it.
    #[arg(long, value_name = "CMD")]
    pub entrypoint: Option<String>,
    /// The image.
    pub image: String,
    /// Command and arguments (default: the image's entrypoint and cmd).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

/// `strata shell`.
#[derive(Debug, Args)]
pub struct ShellArgs {
    /// Process options.
    #[command(flatten)]
    pub process: ProcessArgs,
    /// The container.
    pub container: String,
    /// Command and arguments (default: /bin/sh).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum Format {
    /// Columns for people.
    #[default]
    Table,
    /// JSON for programs.
    Json,
}

/// Who serves the mounts of `strata build`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BuildOverlay {
    /// The kernel's overlayfs where strata may mount it (root), strata's FUSE overlay
    /// otherwise (rootless, or when the kernel refuses the mount).
    Auto,
    /// strata's FUSE overlay.
    Fuse,
    /// The kernel's overlayfs (root in the initial user namespace).
    Kernel,
}

/// Layer compression.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Compress {
    /// Plain tar.
    None,
    /// gzip.
    Gzip,
    /// zstd.
    Zstd,
}

/// `strata commit`.
#[derive(Debug, Args)]
pub struct CommitArgs {
    /// The upper directory of an unmounted overlay (or give a container instead).
    #[arg(long, value_name = "DIR")]
    pub upper: Option<PathBuf>,
    /// The image the upper was mounted over.
    #[arg(long, value_name = "IMAGE")]
    pub base: Option<String>,
    /// Author (config and history).
    #[arg(short = 'a', long)]
    pub author: Option<String>,
    /// Comment for the history entry.
    #[arg(short = 'm', long)]
    pub message: Option<String>,
    /// Dockerfile instruction to apply to the config (CMD, ENTRYPOINT, ENV, EXPOSE, LABEL,
    /// USER, VOLUME, WORKDIR, STOPSIGNAL); repeatable.
    #[arg(short = 'c', long = "change", value_name = "INSTRUCTION")]
    pub change: Vec<String>,
    /// Make one layer of the whole merged tree.
    #[arg(long)]
    pub squash: bool,
    /// Leave out paths matching this glob (`*`, `**`, `?`); repeatable.
    #[arg(long, value_name = "GLOB")]
    pub exclude: Vec<String>,
    /// Layer compression.
    #[arg(long, value_enum, default_value = "gzip")]
    pub compress: Compress,
    /// `[CONTAINER] NAME[:TAG]`: the container to commit (instead of --upper) and the new
    /// image's name.
    #[arg(value_name = "[CONTAINER] NAME[:TAG]", num_args = 1..=2, required = true)]
    pub names: Vec<String>,
}

/// `strata diff`.
#[derive(Debug, Args)]
pub struct DiffArgs {
    /// An upper directory to compare with --base (or with nothing).
    #[arg(long, value_name = "DIR", conflicts_with = "images")]
    pub upper: Option<PathBuf>,
    /// The image the upper was mounted over.
    #[arg(long, value_name = "IMAGE")]
    pub base: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    pub format: Format,
    /// A container, or two images to compare (instead of --upper).
    #[arg(value_name = "CONTAINER | IMAGE IMAGE", num_args = 0..=2)]
    pub images: Vec<String>,
}

/// `strata history`.
#[derive(Debug, Args)]
pub struct HistoryArgs {
    /// The image.
    pub image: String,
    /// Do not shorten digests and commands.
    #[arg(long)]
    pub no_trunc: bool,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    pub format: Format,
}

/// `strata images`.
#[derive(Debug, Args)]
pub struct ImagesArgs {
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    pub format: Format,
    /// Show full ids.
    #[arg(long)]
    pub no_trunc: bool,
}

/// `strata tag`.
#[derive(Debug, Args)]
pub struct TagArgs {
    /// Existing image.
    pub source: String,
    /// New name.
    #[arg(value_name = "NAME[:TAG]")]
    pub target: String,
}

/// `strata rmi`.
#[derive(Debug, Args)]
pub struct RmiArgs {
    /// Remove even while a mount or container uses the image.
    #[arg(short = 'f', long)]
    pub force: bool,
    /// Images (names or ids).
    #[arg(required = true)]
    pub images: Vec<String>,
}

/// `strata inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The image.
    pub image: String,
}

/// `strata save`.
#[derive(Debug, Args)]
pub struct SaveArgs {
    /// Output file.
    #[arg(short = 'o', long, value_name = "FILE")]
    pub output: PathBuf,
    /// Images to save.
    #[arg(required = true)]
    pub images: Vec<String>,
}

/// Options of the registry verbs.
#[derive(Debug, Args, Clone)]
pub struct RegistryArgs {
    /// Credentials file (default: ${XDG_RUNTIME_DIR}/containers/auth.json; pulls and pushes
    /// also read ~/.config/containers/auth.json and ~/.docker/config.json).
    #[arg(long, value_name = "FILE", env = "REGISTRY_AUTH_FILE")]
    pub authfile: Option<PathBuf>,
    /// Directory of CA certificates (*.crt) to trust for this registry, as in docker's
    /// certs.d/HOST (default: /etc/containers/certs.d/HOST or /etc/docker/certs.d/HOST).
    #[arg(long, value_name = "DIR")]
    pub cert_dir: Option<PathBuf>,
    /// Verify the registry's TLS certificate; false also allows plain HTTP (which loopback
    /// registries may always use).
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set,
          num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub tls_verify: bool,
}

/// `strata check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Also decompress every layer blob against its DiffID and compare unpacked layers
    /// with a fresh unpack (slow: reads everything).
    #[arg(long)]
    pub layers: bool,
    /// Remove what cannot be trusted (corrupt blobs, entries of incomplete images, differing
    /// unpacked layers), then collect garbage.
    #[arg(long)]
    pub repair: bool,
}

/// `strata build`.
#[derive(Debug, Args)]
pub struct BuildArgs {
    /// Name and tag of the result (repeatable).
    #[arg(short = 't', long = "tag", value_name = "NAME[:TAG]")]
    pub tags: Vec<String>,
    /// The Dockerfile (default: CONTEXT/Dockerfile; - reads standard input).
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// A build argument (KEY=VALUE, or KEY to take it from the environment); repeatable.
    #[arg(long = "build-arg", value_name = "KEY[=VALUE]")]
    pub build_args: Vec<String>,
    /// Build up to this stage only.
    #[arg(long, value_name = "STAGE")]
    pub target: Option<String>,
    /// Run every step, ignoring the build cache.
    #[arg(long)]
    pub no_cache: bool,
    /// Pull FROM images even when the store has them.
    #[arg(long)]
    pub pull: bool,
    /// Network of RUN steps: none (a fresh loopback only) or host.
    #[arg(long, default_value = "none", value_parser = ["none", "host", "default"])]
    pub network: String,
    /// A label on the result (KEY=VALUE); repeatable.
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
    /// Write the image id to this file.
    #[arg(long, value_name = "FILE")]
    pub iidfile: Option<PathBuf>,
    /// Print only the image id (no step lines, no RUN output).
    #[arg(short, long)]
    pub quiet: bool,
    /// Make the result one layer holding the whole tree (podman's --squash-all).
    #[arg(long)]
    pub squash: bool,
    /// Layer compression: none keeps layers as BuildKit's local store does (fast; use gzip
    /// for images meant for a registry).
    #[arg(long, value_enum, default_value = "none")]
    pub compress: Compress,
    /// What mounts the layers for RUN, COPY and ADD: the kernel's overlayfs over strata's
    /// layers (root only; layers and uppers share one format, and the kernel creates files
    /// several times faster than any FUSE file system), or strata's FUSE overlay.
    #[arg(long, value_enum, default_value = "auto")]
    pub overlay: BuildOverlay,
    /// Platform (only this machine's is built).
    #[arg(long, value_name = "OS/ARCH")]
    pub platform: Option<String>,
    /// Registry options for pulling FROM images.
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// The context directory, or - (a Dockerfile on standard input, no context).
    pub context: PathBuf,
}

/// `strata pull`.
#[derive(Debug, Args)]
pub struct PullArgs {
    /// Registry options.
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Platform to pick from a multi-platform image (os/arch[/variant]; default: this machine's).
    #[arg(long, value_name = "OS/ARCH")]
    pub platform: Option<String>,
    /// Print only the image name.
    #[arg(short, long)]
    pub quiet: bool,
    /// The image: NAME[:TAG] or NAME@sha256:DIGEST.
    pub image: String,
}

/// `strata push`.
#[derive(Debug, Args)]
pub struct PushArgs {
    /// Registry options.
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// No progress output.
    #[arg(short, long)]
    pub quiet: bool,
    /// The local image.
    pub image: String,
    /// Where to push it (default: the image's own name), e.g. HOST:PORT/REPO:TAG.
    pub destination: Option<String>,
}

/// `strata login`.
#[derive(Debug, Args)]
pub struct LoginArgs {
    /// Registry options.
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// User name (asked for on a terminal when missing).
    #[arg(short = 'u', long)]
    pub username: Option<String>,
    /// Password (visible to other users in the process list: prefer --password-stdin).
    #[arg(short = 'p', long)]
    pub password: Option<String>,
    /// Read the password from standard input.
    #[arg(long)]
    pub password_stdin: bool,
    /// The registry: HOST[:PORT] (docker.io for Docker Hub).
    pub server: String,
}

/// `strata logout`.
#[derive(Debug, Args)]
pub struct LogoutArgs {
    /// Credentials file (default: every file `login` writes and `pull` reads).
    #[arg(long, value_name = "FILE", env = "REGISTRY_AUTH_FILE")]
    pub authfile: Option<PathBuf>,
    /// The registry.
    pub server: String,
}

/// `strata load`.
#[derive(Debug, Args)]
pub struct LoadArgs {
    /// Input archive (docker save, OCI archive, skopeo docker-archive; plain or compressed);
    /// standard input when absent or `-`.
    #[arg(short = 'i', long, value_name = "FILE")]
    pub input: Option<PathBuf>,
}

/// `strata import`.
#[derive(Debug, Args)]
pub struct ImportArgs {
    /// Flat rootfs tar (plain, gzip or zstd), or - for standard input.
    pub file: PathBuf,
    /// The new image's name.
    #[arg(value_name = "NAME[:TAG]")]
    pub name: String,
    /// Dockerfile instruction to apply to the config; repeatable.
    #[arg(short = 'c', long = "change", value_name = "INSTRUCTION")]
    pub change: Vec<String>,
    /// Comment for the history entry.
    #[arg(short = 'm', long)]
    pub message: Option<String>,
}

/// `strata export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The image.
    pub image: String,
    /// Output file.
    #[arg(short = 'o', long, value_name = "FILE")]
    pub output: PathBuf,
}

/// `strata mount`.
#[derive(Debug, Args)]
#[command(
    after_help = "Options (-o) use the syntax of kernel overlayfs and fuse-overlayfs: lowerdir=TOP:...:BOTTOM (\\: escapes a colon), upperdir=DIR, workdir=DIR, volatile, userxattr, ro, nodev, nosuid, noexec, allow_other; and strata's own: passthrough=on|off|all (the kernel reads and writes files directly: on = upper files and lower executables, the default; all = every lower file read too, where writing a lower file that is open for reading fails with ETXTBSY), lookup_index=auto|always|off (when a lookup reads a directory's lower layers into an index; default auto), uring=on|off (take requests through per-CPU io_uring queues when the kernel offers it: Linux 6.14+ with the fuse module's enable_uring parameter on; default on), uring_yield=on|off (while nothing else runs, io_uring workers reply as SCHED_IDLE threads so the caller stays on its CPU; needs CAP_SYS_NICE, default on). Unknown options are ignored with a warning."
)]
pub struct MountArgs {
    /// Mount options, comma-separated (repeatable).
    #[arg(short = 'o', value_name = "OPTIONS")]
    pub options: Vec<String>,
    /// A lower layer directory; repeat for more, the first is the top layer.
    #[arg(long = "lower", value_name = "DIR")]
    pub lower: Vec<PathBuf>,
    /// The writable upper directory (needs --work). Without it the mount is read-only.
    #[arg(long, value_name = "DIR")]
    pub upper: Option<PathBuf>,
    /// The work directory, on the same filesystem as the upper directory.
    #[arg(long, value_name = "DIR")]
    pub work: Option<PathBuf>,
    /// Stay in the foreground instead of returning once the mount is live.
    #[arg(short = 'f', long)]
    pub foreground: bool,
    /// Where the background daemon writes its log (default: discarded).
    #[arg(long, value_name = "FILE")]
    pub log_file: Option<PathBuf>,
    /// FUSE worker threads.
    #[arg(long, value_name = "N", default_value_t = crate::fuse::mount::DEFAULT_THREADS)]
    pub threads: usize,
    /// Where to mount; with two arguments the first is an image whose layers are the lowers.
    /// A container name alone mounts that container (at its own rootfs, or at MOUNTPOINT).
    #[arg(value_name = "[IMAGE|CONTAINER] MOUNTPOINT", num_args = 1..=2, required = true)]
    pub targets: Vec<String>,
}

/// `strata umount`.
#[derive(Debug, Args)]
pub struct UmountArgs {
    /// Detach now even if busy; the daemon ends when the last user is gone.
    #[arg(short = 'l', long)]
    pub lazy: bool,
    /// The mountpoint, or a container name.
    pub mountpoint: PathBuf,
}

#[cfg(test)]
mod tests {
    #[test]
    fn definitions_are_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}

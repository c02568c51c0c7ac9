//! Command-line definitions (clap). The help text here is also the source of the man pages.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// strata: a FUSE overlay filesystem compatible with kernel overlayfs, and a container-image
/// layer toolkit.
#[derive(Debug, Parser)]
#[command(name = "strata", version, about, long_about = None)]
pub struct Cli {
    /// More log output (-v info, -vv debug, -vvv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
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
}

/// `strata mount`.
#[derive(Debug, Args)]
#[command(
    after_help = "Options (-o) use the syntax of kernel overlayfs and fuse-overlayfs: lowerdir=TOP:...:BOTTOM (\\: escapes a colon), upperdir=DIR, workdir=DIR, volatile, userxattr, ro, nodev, nosuid, noexec, allow_other. Unknown options are ignored with a warning."
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
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub threads: usize,
    /// Where to mount.
    pub mountpoint: PathBuf,
}

/// `strata umount`.
#[derive(Debug, Args)]
pub struct UmountArgs {
    /// Detach now even if busy; the daemon ends when the last user is gone.
    #[arg(short = 'l', long)]
    pub lazy: bool,
    /// The mountpoint.
    pub mountpoint: PathBuf,
}

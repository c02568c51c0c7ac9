//! The man pages in `man/` are generated from the clap definitions in `src/cli.rs`:
//! `strata.1` plus one `strata-<verb>.1` per subcommand. This test renders them and fails
//! when a page is missing, differs, or belongs to a verb that no longer exists.
//!
//! Regenerate: `UPDATE_MAN=1 cargo test --test man`.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use clap::CommandFactory;

const REGENERATE: &str = "UPDATE_MAN=1 cargo test --test man";

fn man_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("man")
}

/// Every page, by file name. Dates are left empty so the output depends only on the code.
fn render_all() -> BTreeMap<String, Vec<u8>> {
    let mut cmd = strata::cli::Cli::command().disable_help_subcommand(true);
    // Building fills in the display names of subcommands ("strata-mount").
    cmd.build();
    let source = format!("strata {}", env!("CARGO_PKG_VERSION"));
    let mut pages = BTreeMap::new();
    let mut todo = vec![cmd];
    while let Some(c) = todo.pop() {
        todo.extend(c.get_subcommands().filter(|s| !s.is_hide_set()).cloned());
        let man = clap_mangen::Man::new(c)
            .source(source.clone())
            .manual("strata manual");
        let mut buf = Vec::new();
        man.render(&mut buf).expect("rendering a man page");
        pages.insert(man.get_filename(), buf);
    }
    pages
}

/// Man pages currently in `dir` (every `*.1` to `*.9` file).
fn pages_on_disk(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let Ok(rd) = fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let is_page = name
            .rsplit_once('.')
            .is_some_and(|(_, s)| s.len() == 1 && s.as_bytes()[0].is_ascii_digit());
        if is_page && e.path().is_file() {
            out.insert(name, fs::read(e.path()).expect("reading a man page"));
        }
    }
    out
}

#[test]
fn man_pages_match_cli() {
    let want = render_all();
    assert!(
        want.contains_key("strata.1") && want.len() > 1,
        "expected strata.1 and one page per verb, got {:?}",
        want.keys().collect::<Vec<_>>()
    );
    let dir = man_dir();
    let have = pages_on_disk(&dir);

    if std::env::var_os("UPDATE_MAN").is_some_and(|v| v == "1") {
        fs::create_dir_all(&dir).expect("creating man/");
        for (name, body) in &want {
            if have.get(name) != Some(body) {
                fs::write(dir.join(name), body).expect("writing a man page");
                eprintln!("man: wrote man/{name}");
            }
        }
        for name in have.keys().filter(|n| !want.contains_key(*n)) {
            fs::remove_file(dir.join(name)).expect("removing a stale man page");
            eprintln!("man: removed man/{name} (no such verb any more)");
        }
        return;
    }

    let mut problems = Vec::new();
    for (name, body) in &want {
        match have.get(name) {
            None => problems.push(format!("  man/{name}: missing")),
            Some(b) if b != body => problems.push(format!("  man/{name}: out of date")),
            Some(_) => {}
        }
    }
    for name in have.keys().filter(|n| !want.contains_key(*n)) {
        problems.push(format!("  man/{name}: no such command any more"));
    }
    assert!(
        problems.is_empty(),
        "the man pages in man/ do not match src/cli.rs:\n{}\nregenerate them with:\n  {REGENERATE}",
        problems.join("\n")
    );
}

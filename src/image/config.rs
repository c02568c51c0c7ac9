//! Image configs: new configs, history entries, times, and Dockerfile-style changes
//! (`-c 'CMD ...'`).

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use oci_spec::image::{Arch, Config, HistoryBuilder, ImageConfiguration, ImageConfigurationBuilder, Os};

/// SOURCE_DATE_EPOCH, if set.
pub fn source_date_epoch() -> Result<Option<i64>> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(s) if !s.is_empty() => {
            Ok(Some(s.trim().parse().with_context(|| {
                format!("SOURCE_DATE_EPOCH='{s}' is not a number")
            })?))
        }
        _ => Ok(None),
    }
}

/// Now, or SOURCE_DATE_EPOCH when set.
pub fn now_or_epoch() -> Result<i64> {
    Ok(match source_date_epoch()? {
        Some(e) => e,
        None => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs() as i64,
    })
}

/// RFC 3339 (UTC) of a unix time.
pub fn rfc3339(t: i64) -> String {
    let days = t.div_euclid(86400);
    let secs = t.rem_euclid(86400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// A config for a first layer: this machine's architecture, linux.
pub fn new_config() -> Result<ImageConfiguration> {
    let arch = match std::env::consts::ARCH {
        "x86_64" => Arch::Amd64,
        "aarch64" => Arch::ARM64,
        "arm" => Arch::ARM,
        "riscv64" => Arch::RISCV64,
        "s390x" => Arch::s390x,
        "powerpc64" => Arch::PowerPC64le,
        other => Arch::Other(other.to_string()),
    };
    Ok(ImageConfigurationBuilder::default()
        .architecture(arch)
        .os(Os::Linux)
        .build()?)
}

/// Append a layer (its DiffID and history entry) to a config.
pub fn add_layer(
    cfg: &mut ImageConfiguration,
    diff_id: &str,
    created: i64,
    author: Option<&str>,
    created_by: &str,
    comment: Option<&str>,
) -> Result<()> {
    cfg.rootfs_mut().diff_ids_mut().push(diff_id.to_string());
    let mut h = HistoryBuilder::default()
        .created(rfc3339(created))
        .created_by(created_by.to_string());
    if let Some(a) = author {
        h = h.author(a.to_string());
    }
    if let Some(c) = comment {
        h = h.comment(c.to_string());
    }
    let entry = h.build()?;
    cfg.history_mut().get_or_insert_with(Vec::new).push(entry);
    cfg.set_created(Some(rfc3339(created)));
    if let Some(a) = author {
        cfg.set_author(Some(a.to_string()));
    }
    Ok(())
}

/// Split a shell-ish argument string, honouring double and single quotes.
fn words(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    let mut any = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some('"'), '\\') => cur.extend(chars.next()),
            (Some(_), c) => cur.push(c),
            (None, '"' | '\'') => {
                quote = Some(c);
                any = true;
            }
            (None, '\\') => cur.extend(chars.next()),
            (None, c) if c.is_whitespace() => {
                if !cur.is_empty() || any {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            (None, c) => cur.push(c),
        }
    }
    if !cur.is_empty() || any {
        out.push(cur);
    }
    out
}

/// `["a", "b"]` (exec form) or a shell command (shell form).
fn command(arg: &str) -> Result<Vec<String>> {
    let t = arg.trim();
    if t.starts_with('[') {
        serde_json::from_str(t).with_context(|| format!("'{t}' is not a JSON array of strings"))
    } else {
        Ok(vec!["/bin/sh".into(), "-c".into(), t.to_string()])
    }
}

/// key=value pairs (or one legacy `KEY value`).
fn pairs(arg: &str, what: &str) -> Result<Vec<(String, String)>> {
    let w = words(arg);
    if w.len() >= 2 && !w[0].contains('=') {
        return Ok(vec![(w[0].clone(), w[1..].join(" "))]);
    }
    w.into_iter()
        .map(|p| match p.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => bail!("{what}: '{p}' is not KEY=VALUE"),
        })
        .collect()
}

/// Apply one Dockerfile instruction (CMD, ENTRYPOINT, ENV, EXPOSE, LABEL, USER, VOLUME,
/// WORKDIR, STOPSIGNAL) to a config.
pub fn apply_change(cfg: &mut ImageConfiguration, change: &str) -> Result<()> {
    let change = change.trim();
    let (ins, arg) = change.split_once(char::is_whitespace).unwrap_or((change, ""));
    let arg = arg.trim();
    let mut c: Config = cfg.config().clone().unwrap_or_default();
    match ins.to_ascii_uppercase().as_str() {
        "CMD" => {
            c.set_cmd(Some(command(arg)?));
        }
        "ENTRYPOINT" => {
            c.set_entrypoint(Some(command(arg)?));
        }
        "ENV" => {
            let mut env = c.env().clone().unwrap_or_default();
            for (k, v) in pairs(arg, "ENV")? {
                env.retain(|e| e.split('=').next() != Some(&k));
                env.push(format!("{k}={v}"));
            }
            c.set_env(Some(env));
        }
        "LABEL" => {
            let mut l: HashMap<String, String> = c.labels().clone().unwrap_or_default();
            l.extend(pairs(arg, "LABEL")?);
            c.set_labels(Some(l));
        }
        "EXPOSE" => {
            let mut p = c.exposed_ports().clone().unwrap_or_default();
            for w in words(arg) {
                let port = if w.contains('/') { w } else { format!("{w}/tcp") };
                let (num, proto) = port.split_once('/').unwrap();
                if num.parse::<u16>().is_err() || !matches!(proto, "tcp" | "udp" | "sctp") {
                    bail!("EXPOSE: '{port}' is not PORT[/tcp|udp|sctp]");
                }
                if !p.contains(&port) {
                    p.push(port);
                }
            }
            c.set_exposed_ports(Some(p));
        }
        "VOLUME" => {
            let mut v = c.volumes().clone().unwrap_or_default();
            let list: Vec<String> = if arg.starts_with('[') { serde_json::from_str(arg)? } else { words(arg) };
            for x in list {
                if !v.contains(&x) {
                    v.push(x);
                }
            }
            c.set_volumes(Some(v));
        }
        "USER" if !arg.is_empty() => {
            c.set_user(Some(arg.to_string()));
        }
        "WORKDIR" if arg.starts_with('/') => {
            c.set_working_dir(Some(arg.to_string()));
        }
        "WORKDIR" => bail!("WORKDIR needs an absolute path, got '{arg}'"),
        "STOPSIGNAL" if !arg.is_empty() => {
            c.set_stop_signal(Some(arg.to_string()));
        }
        "" => bail!("empty --change"),
        other => bail!("unsupported instruction '{other}' in --change (CMD, ENTRYPOINT, ENV, EXPOSE, LABEL, USER, VOLUME, WORKDIR, STOPSIGNAL)"),
    }
    cfg.set_config(Some(c));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1700000000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(951782400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn changes() {
        let mut c = new_config().unwrap();
        apply_change(&mut c, r#"CMD ["/bin/sh", "-c", "echo hi"]"#).unwrap();
        apply_change(&mut c, "ENTRYPOINT /init --x").unwrap();
        apply_change(&mut c, "ENV A=1 B=\"two words\"").unwrap();
        apply_change(&mut c, "ENV A 3").unwrap();
        apply_change(&mut c, "EXPOSE 80 53/udp").unwrap();
        apply_change(&mut c, "LABEL a=b").unwrap();
        apply_change(&mut c, "WORKDIR /srv").unwrap();
        apply_change(&mut c, "USER 1000:1000").unwrap();
        apply_change(&mut c, "VOLUME /data").unwrap();
        apply_change(&mut c, "STOPSIGNAL SIGINT").unwrap();
        let cc = c.config().clone().unwrap();
        assert_eq!(cc.cmd().clone().unwrap(), vec!["/bin/sh", "-c", "echo hi"]);
        assert_eq!(
            cc.entrypoint().clone().unwrap(),
            vec!["/bin/sh", "-c", "/init --x"]
        );
        assert_eq!(cc.env().clone().unwrap(), vec!["B=two words", "A=3"]);
        assert_eq!(cc.exposed_ports().clone().unwrap(), vec!["80/tcp", "53/udp"]);
        assert_eq!(cc.working_dir().as_deref(), Some("/srv"));
        assert!(apply_change(&mut c, "RUN rm -rf /").is_err());
        assert!(apply_change(&mut c, "WORKDIR relative").is_err());
        assert!(apply_change(&mut c, "EXPOSE http").is_err());
    }
}

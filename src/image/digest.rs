//! sha256 digests computed while streaming.

use std::io::{self, Read, Write};

use sha2::{Digest as _, Sha256};

/// `sha256:<hex>` of some bytes.
pub fn sha256_of(data: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(data)))
}

/// Lower-case hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The hex part of `sha256:<hex>`, checked: 64 lower-case hex digits.
pub fn hex_part(digest: &str) -> Option<&str> {
    let h = digest.strip_prefix("sha256:")?;
    (h.len() == 64
        && h.bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)))
    .then_some(h)
}

/// A writer that hashes and counts what passes through.
pub struct HashWriter<W> {
    inner: W,
    hasher: Sha256,
    /// Bytes written so far.
    pub count: u64,
}

impl<W: Write> HashWriter<W> {
    /// Wrap `inner`.
    pub fn new(inner: W) -> Self {
        HashWriter {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }
    /// `sha256:<hex>` of everything written, the byte count and the inner writer.
    pub fn finish(self) -> (String, u64, W) {
        (
            format!("sha256:{}", hex(&self.hasher.finalize())),
            self.count,
            self.inner,
        )
    }
    /// The inner writer.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }
}

impl<W: Write> Write for HashWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A reader that hashes and counts what passes through.
pub struct HashReader<R> {
    inner: R,
    hasher: Sha256,
    /// Bytes read so far.
    pub count: u64,
}

impl<R: Read> HashReader<R> {
    /// Wrap `inner`.
    pub fn new(inner: R) -> Self {
        HashReader {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }
    /// `sha256:<hex>` of everything read and the byte count.
    pub fn finish(self) -> (String, u64) {
        (format!("sha256:{}", hex(&self.hasher.finalize())), self.count)
    }
}

impl<R: Read> Read for HashReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// Hash a whole stream.
pub fn sha256_reader<R: Read>(r: R) -> io::Result<(String, u64)> {
    let mut h = HashReader::new(r);
    io::copy(&mut h, &mut io::sink())?;
    Ok(h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_digests() {
        assert_eq!(
            sha256_of(b"{}"),
            "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
        );
        let mut w = HashWriter::new(Vec::new());
        w.write_all(b"{}").unwrap();
        assert_eq!(w.finish().0, sha256_of(b"{}"));
        assert!(
            hex_part("sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a").is_some()
        );
        assert!(
            hex_part("sha256:44136FA355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a").is_none()
        );
        assert!(hex_part("sha256:../../etc").is_none());
    }
}

//! Built-in local delivery into a Maildir: each accepted message is written
//! to tmp/, fsynced, then renamed into new/ (and the directory fsynced)
//! before the client hears 250. `Maildir` creates tmp/, new/ and cur/;
//! `MaildirWriter` un-stuffs the wire data into tmp/, and a writer dropped
//! uncommitted removes its file.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::io::AsyncWriteExt;

use crate::smtp::Unstuffer;

#[derive(Debug)]
pub struct Maildir {
    root: PathBuf,
    hostname: String,
    counter: AtomicU64,
}

impl Maildir {
    /// Opens (creating tmp/, new/ and cur/ when missing) the Maildir at `root`.
    pub fn open(root: &Path, hostname: &str) -> std::io::Result<Maildir> {
        for sub in ["tmp", "new", "cur"] {
            std::fs::create_dir_all(root.join(sub))?;
        }
        Ok(Maildir {
            root: root.to_path_buf(),
            hostname: hostname.replace(['/', ':'], "_"),
            counter: AtomicU64::new(0),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Starts writing one message into tmp/.
    pub async fn begin(&self) -> std::io::Result<MaildirWriter> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let name = format!(
            "{}.M{}P{}Q{}.{}",
            now.as_secs(),
            now.subsec_micros(),
            std::process::id(),
            n,
            self.hostname
        );
        let tmp = self.root.join("tmp").join(&name);
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .await?;
        Ok(MaildirWriter {
            file: Some(file),
            final_path: self.root.join("new").join(&name),
            tmp,
            unstuffer: Unstuffer::new(),
            buf: Vec::new(),
            id: name,
        })
    }
}

/// One message being written.
#[derive(Debug)]
pub struct MaildirWriter {
    file: Option<tokio::fs::File>,
    tmp: PathBuf,
    final_path: PathBuf,
    unstuffer: Unstuffer,
    buf: Vec<u8>,
    pub id: String,
}

impl MaildirWriter {
    /// Writes wire-form (dot-stuffed) data; the stuffing and the final
    /// `.\r\n` are removed.
    pub async fn write_wire(&mut self, wire: &[u8]) -> std::io::Result<()> {
        self.buf.clear();
        self.unstuffer.feed(wire, &mut self.buf);
        if let Some(f) = self.file.as_mut() {
            f.write_all(&self.buf).await?;
        }
        Ok(())
    }

    /// fsync, move into new/, fsync the directory.
    pub async fn commit(mut self) -> std::io::Result<PathBuf> {
        if let Some(mut f) = self.file.take() {
            f.flush().await?;
            f.sync_all().await?;
        }
        tokio::fs::rename(&self.tmp, &self.final_path).await?;
        if let Some(dir) = self.final_path.parent() {
            let dir = dir.to_path_buf();
            let _ = tokio::task::spawn_blocking(move || {
                std::fs::File::open(&dir).and_then(|d| d.sync_all())
            })
            .await;
        }
        Ok(std::mem::take(&mut self.final_path))
    }
}

impl Drop for MaildirWriter {
    fn drop(&mut self) {
        // Not committed: remove the partial file.
        if !self.final_path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

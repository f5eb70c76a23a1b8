//! A loopback stand-in for the Hugging Face hub: `HEAD`/`GET /OWNER/REPO/resolve/REV/FILE` (models) and
//! `/datasets/OWNER/REPO/resolve/REV/FILE` (datasets) with the `ETag` and `X-Repo-Commit` headers hf-hub needs,
//! 404 for anything else. Started by the tests themselves.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

pub const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

pub struct MockHub {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    requests: Arc<AtomicUsize>,
    worker: Option<JoinHandle<()>>,
}

impl MockHub {
    /// Serves `files` (`"OWNER/REPO/FILE"` or `"datasets/OWNER/REPO/FILE"` → local file) at any revision.
    pub fn start(files: HashMap<String, PathBuf>) -> MockHub {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding a loopback port");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(AtomicUsize::new(0));
        let (stop2, requests2) = (stop.clone(), requests.clone());
        let worker = std::thread::spawn(move || {
            while !stop2.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        requests2.fetch_add(1, Ordering::SeqCst);
                        let _ = serve(stream, &files);
                    }
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(5)),
                }
            }
        });
        MockHub {
            addr,
            stop,
            requests,
            worker: Some(worker),
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// Stops serving and closes the port.
    pub fn shut_down(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

impl Drop for MockHub {
    fn drop(&mut self) {
        self.shut_down();
    }
}

fn serve(stream: TcpStream, files: &HashMap<String, PathBuf>) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header.trim().is_empty() {
            break;
        }
    }
    let mut parts = request.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    // [/datasets]/OWNER/REPO/resolve/REV/FILE (REV may contain no slash here; FILE may).
    let path = path.trim_start_matches('/');
    let (kind, path) = match path.strip_prefix("datasets/") {
        Some(rest) => ("datasets/", rest),
        None => ("", path),
    };
    let segments: Vec<&str> = path.splitn(5, '/').collect();
    let file = match segments.as_slice() {
        [owner, repo, "resolve", _rev, file] => files.get(&format!("{kind}{owner}/{repo}/{file}")),
        _ => None,
    };
    let mut out = stream;
    let Some(file) = file else {
        return out.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nX-Error-Code: EntryNotFound\r\nConnection: close\r\n\r\n");
    };
    let mut body = Vec::new();
    std::fs::File::open(file)?.read_to_end(&mut body)?;
    let etag = format!(
        "{:016x}",
        body.iter()
            .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ *b as u64)
                .wrapping_mul(0x100_0000_01b3))
    );
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nETag: \"{etag}\"\r\nX-Repo-Commit: {COMMIT}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    out.write_all(head.as_bytes())?;
    if method != "HEAD" {
        out.write_all(&body)?;
    }
    out.flush()
}

/// The parquet files of `tests/fixtures/hub-cifar` (made by `make_hub_cifar_parquet.py` from the 20 original
/// CIFAR-10 test PNGs), under the hub paths of `uoft-cs/cifar10` and `uoft-cs/cifar100`.
pub fn cifar_dataset_files() -> HashMap<String, PathBuf> {
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/hub-cifar");
    let mut files = HashMap::new();
    for (repo, config) in [("cifar10", "plain_text"), ("cifar100", "cifar100")] {
        for split in ["train", "test"] {
            let file = format!("{config}/{split}-00000-of-00001.parquet");
            let local = fixtures.join(repo).join(&file);
            assert!(local.is_file(), "missing fixture {}", local.display());
            files.insert(format!("datasets/uoft-cs/{repo}/{file}"), local);
        }
    }
    files
}

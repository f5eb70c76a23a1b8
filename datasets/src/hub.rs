//! Files from the Hugging Face hub through hf-hub and its standard cache (HF_HOME, HF_HUB_CACHE, HF_ENDPOINT,
//! HF_TOKEN); `HF_HUB_OFFLINE=1` uses the cache only, and an unreachable hub falls back to the cached copy
//! (as huggingface_hub does). Shared by datasets (`--data hub:…`) and weights (`--weights hub:…`).

use crate::{DatasetError, Result};
use hf_hub::{HFClientSync, HFError, HFRepositorySync, RepoType};
use std::path::PathBuf;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepoKind {
    Model,
    Dataset,
}

/// One hub repository: `OWNER/REPO` at an optional revision (branch, tag, commit or `refs/pr/N`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubRepo {
    pub kind: RepoKind,
    pub owner: String,
    pub name: String,
    pub revision: Option<String>,
}

impl HubRepo {
    /// Parses `OWNER/REPO[@REVISION]`.
    pub fn parse(kind: RepoKind, spec: &str) -> std::result::Result<HubRepo, String> {
        let (repo_id, revision) = match spec.split_once('@') {
            Some((_, "")) => return Err("empty revision".into()),
            Some((r, rev)) => (r, Some(rev.to_string())),
            None => (spec, None),
        };
        match repo_id.split_once('/') {
            Some((owner, name)) if !owner.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(HubRepo {
                    kind,
                    owner: owner.into(),
                    name: name.into(),
                    revision,
                })
            }
            _ => Err(format!("`{repo_id}` is not OWNER/REPO")),
        }
    }

    pub fn id(&self) -> String {
        format!("{}/{}", self.owner, self.name)
    }

    /// Local path of `file` (downloaded into the cache if needed).
    pub fn fetch(&self, file: &str) -> Result<PathBuf> {
        let client = HFClientSync::new().map_err(|e| self.error(file, e))?;
        match self.kind {
            RepoKind::Model => self.fetch_from(client.model(&self.owner, &self.name), file),
            RepoKind::Dataset => self.fetch_from(client.dataset(&self.owner, &self.name), file),
        }
    }

    fn fetch_from<T: RepoType>(&self, repo: HFRepositorySync<T>, file: &str) -> Result<PathBuf> {
        let offline = std::env::var("HF_HUB_OFFLINE")
            .is_ok_and(|v| !v.is_empty() && v != "0" && v.to_lowercase() != "false");
        let download = |local_only: bool| {
            repo.download_file()
                .filename(file)
                .maybe_revision(self.revision.clone())
                .local_files_only(local_only)
                .send()
        };
        match download(offline) {
            Ok(path) => Ok(path),
            Err(HFError::LocalEntryNotFound { .. }) if offline => Err(self.error(
                file,
                "not in the hub cache and HF_HUB_OFFLINE is set (unset it to download)",
            )),
            Err(e) => match download(true) {
                Ok(path) if !offline => {
                    eprintln!(
                        "note: the hub did not answer ({e}); using the cached {file} of {}",
                        self.id()
                    );
                    Ok(path)
                }
                _ => Err(self.error(file, e)),
            },
        }
    }

    fn error(&self, file: &str, reason: impl ToString) -> DatasetError {
        DatasetError::Hub {
            what: format!("{file} of {}{}", self.kind_prefix(), self.id()),
            reason: reason.to_string(),
        }
    }

    fn kind_prefix(&self) -> &'static str {
        match self.kind {
            RepoKind::Model => "",
            RepoKind::Dataset => "dataset ",
        }
    }
}

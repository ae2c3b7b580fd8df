//! The built image: the base's config with the app's settings (env with `PORT`, `/app`, the
//! run command, the port, labels, one history entry per layer), its layers on top of the
//! base's, committed to the image store under `lull.local/<service>:<build>`.

use lull_runtime::reference::Reference;
use lull_runtime::store::{
    BuiltLayer, HistoryEntry, ImageConfigEdit, ImageRecord, ImageStore, IngestGuard,
};

use crate::build::{BuildError, BuildRequest, StackLayer};
use crate::sandbox::WORKDIR;

/// Commits the image of `req` whose layers above the base are `stack` (lowest first).
pub fn commit(
    store: &ImageStore,
    guard: &IngestGuard<'_>,
    req: &BuildRequest,
    stack: &[StackLayer],
) -> Result<ImageRecord, BuildError> {
    let recipe = &req.recipe;
    let mut edit = ImageConfigEdit {
        env: recipe.run_env.clone(),
        working_dir: Some(WORKDIR.to_owned()),
        entrypoint: recipe.run_command.as_ref().map(|_| Vec::new()),
        cmd: recipe.run_command.clone(),
        exposed_ports: vec![format!("{}/tcp", recipe.port)],
        labels: recipe.labels.iter().cloned().collect(),
        ..ImageConfigEdit::default()
    };
    for layer in stack {
        edit.added_diff_ids.push(layer.layer.diff_id.clone());
        edit.history.push(HistoryEntry {
            created_by: Some(format!("lull build: {}", layer.step)),
            ..HistoryEntry::default()
        });
    }
    let base_config = store
        .read_config(&req.base)
        .map_err(|e| BuildError::Store(e.to_string()))?;
    let config = edit
        .apply(&base_config)
        .map_err(|e| BuildError::Store(e.to_string()))?;
    let mut layers: Vec<BuiltLayer> = req.base.layers.iter().map(BuiltLayer::from).collect();
    layers.extend(stack.iter().map(|l| l.layer.clone()));
    let tag: Reference = format!("lull.local/{}:{}", req.service, req.build_id)
        .parse()
        .map_err(|e| BuildError::Store(format!("image tag for {}: {e}", req.service)))?;
    store
        .commit_built(guard, &config, &layers, std::slice::from_ref(&tag))
        .map_err(|e| BuildError::Store(e.to_string()))
}

//! Where destination definitions live: the [`Definitions`] seam.
//!
//! Embedded, they are a table of the engine's own SQLite file (beside its
//! statistics, dead letters and delivery markers). In cluster mode they are
//! control-plane state, shared by every node in the control database (the server
//! implements this trait on PostgreSQL); each node then follows changes made
//! elsewhere with [`crate::Engine::sync_definitions`], which starts, restarts or
//! stops its own workers to match.
//!
//! A stored definition is always valid: the engine validates it before writing.

use async_trait::async_trait;

use crate::error::DestinationError;
pub use crate::store::DestinationRow;

/// Stores destination definitions. Every write is committed when it returns `Ok`.
#[async_trait]
pub trait Definitions: Send + Sync + 'static {
    /// Stores a new destination.
    async fn insert(&self, row: DestinationRow) -> Result<(), DestinationError>;
    /// Replaces a destination's definition; `false` when it is gone.
    async fn update(&self, row: DestinationRow) -> Result<bool, DestinationError>;
    /// Deletes a destination's definition; `false` when there was none.
    async fn delete(&self, id: &str) -> Result<bool, DestinationError>;
    /// Every destination, oldest first.
    async fn list(&self) -> Result<Vec<DestinationRow>, DestinationError>;
    /// One destination.
    async fn get(&self, id: &str) -> Result<Option<DestinationRow>, DestinationError>;
}

#[async_trait]
impl Definitions for crate::store::Store {
    async fn insert(&self, row: DestinationRow) -> Result<(), DestinationError> {
        self.insert_destination(row).await
    }
    async fn update(&self, row: DestinationRow) -> Result<bool, DestinationError> {
        let id = row.id.clone();
        self.update_destination(row).await?;
        Ok(self.destination(&id).await?.is_some())
    }
    async fn delete(&self, id: &str) -> Result<bool, DestinationError> {
        self.delete_destination(id).await
    }
    async fn list(&self) -> Result<Vec<DestinationRow>, DestinationError> {
        self.destinations().await
    }
    async fn get(&self, id: &str) -> Result<Option<DestinationRow>, DestinationError> {
        self.destination(id).await
    }
}

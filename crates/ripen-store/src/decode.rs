//! Checked conversions of column values, shared by every backend.

use ripen_core::{EntityStatus, StepStatus};

use crate::{EntityId, Result, StoreError};

pub(crate) fn to_u32(v: i64, what: &str) -> Result<u32> {
    u32::try_from(v).map_err(|_| StoreError::Internal(format!("{what} out of range: {v}")))
}

pub(crate) fn to_u64(v: i64, what: &str) -> Result<u64> {
    u64::try_from(v).map_err(|_| StoreError::Internal(format!("{what} out of range: {v}")))
}

pub(crate) fn to_i64(v: u64, what: &str) -> Result<i64> {
    i64::try_from(v).map_err(|_| StoreError::Internal(format!("{what} out of range: {v}")))
}

pub(crate) fn entity_id(bytes: &[u8]) -> Result<EntityId> {
    EntityId::from_slice(bytes).ok_or_else(|| {
        StoreError::Internal(format!("malformed entity id of {} bytes", bytes.len()))
    })
}

pub(crate) fn entity_status(s: &str) -> Result<EntityStatus> {
    EntityStatus::parse(s)
        .ok_or_else(|| StoreError::Internal(format!("unknown entity status {s:?}")))
}

pub(crate) fn step_status(s: &str) -> Result<StepStatus> {
    StepStatus::parse(s).ok_or_else(|| StoreError::Internal(format!("unknown step status {s:?}")))
}

//! Locking helpers.

use std::sync::Mutex;

/// Locks `m`, going on with the data of a task that panicked holding it
/// (every critical section here leaves the data consistent).
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

//! Attacks: tokens (filled in by its item's fix).

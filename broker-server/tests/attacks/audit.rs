//! Attacks: audit (filled in by its item's fix).

//! Attacks: secrets (filled in by its item's fix).

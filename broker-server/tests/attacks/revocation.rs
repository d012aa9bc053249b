//! Attacks: revocation (filled in by its item's fix).

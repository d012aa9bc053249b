//! Attacks: transport (filled in by its item's fix).

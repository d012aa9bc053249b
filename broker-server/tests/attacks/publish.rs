//! Attacks: publish (filled in by its item's fix).

//! Attacks: data_folder (filled in by its item's fix).

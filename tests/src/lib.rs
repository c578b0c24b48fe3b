//! Helpers shared by the integration scenarios in `it/`.

//! Simulated sessions (placeholder).

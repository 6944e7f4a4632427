//! (exposer: filled in by the exposer work)

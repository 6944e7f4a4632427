//! (predictor/guard: filled in by the predictor work)

//! Proof that the checks can fail: each test feeds a checker a deliberately broken state or
//! trace and asserts that it reports the violation.

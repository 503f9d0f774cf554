//! Viterbi encoder (in progress).

//! The built-in calibration text, used when no `--calibration` file is given: a mix of
//! English prose, technical writing, source code and several other languages, all written
//! for or by this project (see `data/CALIBRATION.md` for what is in it and where it came
//! from). It is compiled into the binary: nothing is ever downloaded.

/// The default calibration text.
pub const DEFAULT_TEXT: &str = include_str!("../data/calibration.txt");

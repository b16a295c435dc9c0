//! Range checks for config values, so that no value a config can hold reaches a Burn assert
//! (burn-nn's `Dropout` panics outside `[0, 1)`, a zero-sized tensor fails a broadcast).
//! Messages name the key and the allowed range.

/// `value` must be a probability usable as a dropout or drop-path rate: `0 <= value < 1`.
pub fn probability(key: &str, value: f64) -> Result<(), String> {
    if (0.0..1.0).contains(&value) {
        Ok(())
    } else {
        Err(format!("{key} = {value} must be in [0, 1)"))
    }
}

/// `value` must be finite.
pub fn finite(key: &str, value: f64) -> Result<(), String> {
    if value.is_finite() {
        Ok(())
    } else {
        Err(format!("{key} = {value} must be a finite number"))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn ranges() {
        assert!(super::probability("k", 0.0).is_ok() && super::probability("k", 0.99).is_ok());
        for bad in [1.0, -0.1, f64::NAN, 2.0] {
            assert_eq!(super::probability("a.b", bad).unwrap_err(), format!("a.b = {bad} must be in [0, 1)"));
        }
        assert!(super::finite("k", f64::INFINITY).is_err() && super::finite("k", -3.0).is_ok());
    }
}

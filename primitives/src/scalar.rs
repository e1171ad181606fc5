//! The C scalar types a `Value` or `Array` holds, and Python's typecodes for them.
//!
//! | typecode | C type | Rust |
//! | --- | --- | --- |
//! | `'b'` | signed char | `i8` |
//! | `'B'`, `'c'` | unsigned char, char | `u8` |
//! | `'h'` | short | `i16` |
//! | `'H'` | unsigned short | `u16` |
//! | `'i'` | int | `i32` |
//! | `'I'` | unsigned int | `u32` |
//! | `'l'`, `'q'` | long, long long | `i64` |
//! | `'L'`, `'Q'` | unsigned long, unsigned long long | `u64` |
//! | `'f'` | float | `f32` |
//! | `'d'` | double | `f64` |
//! | `'?'` | bool | `bool` |
//! | `'u'` | wchar_t | `char` |
//!
//! Values are stored as Redis strings in their decimal (or `0`/`1`, or UTF-8) form, so that
//! integers can be added to atomically on the server.

mod sealed {
    pub trait Sealed {}
}

/// A type a `Value` or `Array` can hold.
pub trait Scalar: Copy + Send + Sync + std::fmt::Debug + 'static + sealed::Sealed {
    /// Python's typecode for the type.
    const TYPECODE: char;
    /// The zero value (`Array::zeroed`).
    const ZERO: Self;
    /// The stored form.
    fn to_stored(&self) -> String;
    /// Parses the stored form.
    fn from_stored(text: &str) -> Option<Self>;
}

/// An integer type: `fetch_add` works on it, within the type's range.
pub trait Integer: Scalar {
    /// Smallest value.
    const LOW: i128;
    /// Largest value.
    const HIGH: i128;
    /// Converts a value the server returned.
    fn from_i64(v: i64) -> Option<Self>;
}

macro_rules! integer {
    ($t:ty, $code:expr) => {
        impl sealed::Sealed for $t {}
        impl Scalar for $t {
            const TYPECODE: char = $code;
            const ZERO: Self = 0;
            fn to_stored(&self) -> String {
                self.to_string()
            }
            fn from_stored(text: &str) -> Option<Self> {
                text.parse().ok()
            }
        }
        impl Integer for $t {
            const LOW: i128 = <$t>::MIN as i128;
            const HIGH: i128 = <$t>::MAX as i128;
            fn from_i64(v: i64) -> Option<Self> {
                <$t>::try_from(v).ok()
            }
        }
    };
}

integer!(i8, 'b');
integer!(u8, 'B');
integer!(i16, 'h');
integer!(u16, 'H');
integer!(i32, 'i');
integer!(u32, 'I');
integer!(i64, 'q');
integer!(u64, 'Q');

macro_rules! float {
    ($t:ty, $code:expr) => {
        impl sealed::Sealed for $t {}
        impl Scalar for $t {
            const TYPECODE: char = $code;
            const ZERO: Self = 0.0;
            fn to_stored(&self) -> String {
                // Round-trips exactly.
                format!("{:?}", self)
            }
            fn from_stored(text: &str) -> Option<Self> {
                text.parse().ok()
            }
        }
    };
}

float!(f32, 'f');
float!(f64, 'd');

impl sealed::Sealed for bool {}
impl Scalar for bool {
    const TYPECODE: char = '?';
    const ZERO: Self = false;
    fn to_stored(&self) -> String {
        u8::from(*self).to_string()
    }
    fn from_stored(text: &str) -> Option<Self> {
        match text {
            "0" => Some(false),
            "1" => Some(true),
            _ => None,
        }
    }
}

impl sealed::Sealed for char {}
impl Scalar for char {
    const TYPECODE: char = 'u';
    const ZERO: Self = '\0';
    fn to_stored(&self) -> String {
        self.to_string()
    }
    fn from_stored(text: &str) -> Option<Self> {
        let mut chars = text.chars();
        match (chars.next(), chars.next()) {
            (Some(c), None) => Some(c),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip<T: Scalar + PartialEq>(values: &[T]) {
        for v in values {
            assert_eq!(T::from_stored(&v.to_stored()), Some(*v), "{v:?}");
        }
    }

    #[test]
    fn stored_forms_round_trip() {
        round_trip(&[i8::MIN, -1, 0, i8::MAX]);
        round_trip(&[u64::MAX, 0]);
        round_trip(&[i64::MIN, i64::MAX]);
        round_trip(&[0.1f64, -3.5e300, f64::MIN_POSITIVE]);
        round_trip(&[0.1f32, 1e-30]);
        round_trip(&[true, false]);
        round_trip(&['a', 'λ', '\0']);
        assert_eq!(i32::from_stored("12x"), None);
        assert_eq!(bool::from_stored("2"), None);
        assert_eq!(char::from_stored("ab"), None);
        assert_eq!((i32::TYPECODE, f64::TYPECODE), ('i', 'd'));
    }
}

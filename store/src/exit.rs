//! The process exit codes of `xenod`: one table for every crate. Each
//! crate's error knows its code (`exit_code()`), so the binary never walks
//! an error chain to guess it.

/// A documented exit code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Exit {
    Success = 0,
    Failure = 1,
    Usage = 2,
    NotFound = 3,
    Damaged = 4,
    NameRefused = 5,
    BadInput = 6,
    NoProvider = 7,
    NoHost = 8,
    Capacity = 9,
}

impl Exit {
    /// Every code, in order: the table `--help` and the README show.
    pub const ALL: [Exit; 10] = [
        Exit::Success,
        Exit::Failure,
        Exit::Usage,
        Exit::NotFound,
        Exit::Damaged,
        Exit::NameRefused,
        Exit::BadInput,
        Exit::NoProvider,
        Exit::NoHost,
        Exit::Capacity,
    ];

    /// The number the process exits with.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The code with that number; unknown numbers are [`Exit::Failure`].
    pub fn from_code(code: u64) -> Self {
        Self::ALL.into_iter().find(|e| u64::from(e.code()) == code).unwrap_or(Exit::Failure)
    }

    /// What the code means, one line.
    pub fn meaning(self) -> &'static str {
        match self {
            Exit::Success => "success",
            Exit::Failure => "any other failure (I/O, database, ...)",
            Exit::Usage => "usage error",
            Exit::NotFound => "a reference (name, id, prefix) matches no layer",
            Exit::Damaged => "the store is damaged (verify found bad or missing chunks)",
            Exit::NameRefused => {
                "a name record was refused (bad signature, key not trusted for its publisher, older sequence), or a name no longer holds (removed, or NAME@ID moved on)"
            }
            Exit::BadInput => "bad input: a tree, tar stream or manifest that cannot be stored or exported as given",
            Exit::NoProvider => {
                "no provider could supply a layer (every peer given is unreachable, dropped, or lacks it)"
            }
            Exit::NoHost => "no host can take the guest: placement removed every host, or every host chosen failed",
            Exit::Capacity => {
                "not admitted: the guest asks more memory, vCPUs or upper-layer disk than this host has free"
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_their_position_and_round_trip() {
        for (i, e) in Exit::ALL.into_iter().enumerate() {
            assert_eq!(usize::from(e.code()), i);
            assert_eq!(Exit::from_code(i as u64), e);
        }
        assert_eq!(Exit::from_code(200), Exit::Failure);
    }
}

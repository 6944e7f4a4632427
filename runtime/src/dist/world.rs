//! [`World`]: this process's place in a data-parallel run, from torchrun's environment
//! variables (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`), so that
//! `lexp finetune --workers N`, torchrun and any other launcher that follows its convention
//! start workers the same way.

use super::DistError;

/// Rank, world size and where rank 0 listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct World {
    /// This process's rank, `0..world_size`; rank 0 writes every output file.
    pub rank: usize,
    /// Number of worker processes.
    pub world_size: usize,
    /// Rank among the workers of this host (selects the GPU).
    pub local_rank: usize,
    /// Host rank 0 listens on.
    pub master_addr: String,
    /// Port rank 0 listens on.
    pub master_port: u16,
}

/// The variables, in the order their errors are reported.
pub const VARS: [&str; 5] = [
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
];

impl World {
    /// One process alone (no variable set): rank 0 of 1.
    pub fn single() -> World {
        World {
            rank: 0,
            world_size: 1,
            local_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: 0,
        }
    }

    /// Whether there is more than one worker.
    pub fn is_distributed(&self) -> bool {
        self.world_size > 1
    }

    /// Whether this process writes the run's files (checkpoints, metrics, the adapter).
    pub fn is_writer(&self) -> bool {
        self.rank == 0
    }

    /// The CUDA device this worker uses when the process sees `visible` GPUs: device 0 when it
    /// sees one (the `--gpus` launcher gives each worker its own `CUDA_VISIBLE_DEVICES`), else
    /// device `LOCAL_RANK` (torchrun leaves every GPU visible), or 0 past the last device.
    pub fn gpu_ordinal(&self, visible: usize) -> usize {
        if visible > 1 && self.local_rank < visible {
            self.local_rank
        } else {
            0
        }
    }

    /// `MASTER_ADDR:MASTER_PORT`.
    pub fn master(&self) -> String {
        format!("{}:{}", self.master_addr, self.master_port)
    }

    /// The world of this process from its environment ([`World::from_vars`]).
    pub fn from_env() -> Result<World, DistError> {
        World::from_vars(|k| std::env::var(k).ok())
    }

    /// The world described by `get` (a variable's value, `None` when unset): [`World::single`]
    /// when neither `RANK` nor `WORLD_SIZE` is set; else `RANK` and `WORLD_SIZE` are
    /// required, `LOCAL_RANK` defaults to `RANK`, and with more than one worker
    /// `MASTER_ADDR` and `MASTER_PORT` are required. Errors name the variable.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<World, DistError> {
        let get = |k: &str| get(k).filter(|v| !v.trim().is_empty());
        let (rank, size) = (get("RANK"), get("WORLD_SIZE"));
        if rank.is_none() && size.is_none() {
            return Ok(World::single());
        }
        let need = |var: &'static str, v: Option<String>, other: &str| {
            v.ok_or_else(|| DistError::MissingVar {
                var,
                why: format!("{other} is set: a distributed run needs RANK and WORLD_SIZE"),
            })
        };
        let rank_s = need("RANK", rank, "WORLD_SIZE")?;
        let size_s = need("WORLD_SIZE", size, "RANK")?;
        let world_size: usize = parse("WORLD_SIZE", &size_s)?;
        if world_size == 0 {
            return Err(bad("WORLD_SIZE", &size_s, "must be at least 1"));
        }
        let rank: usize = parse("RANK", &rank_s)?;
        if rank >= world_size {
            return Err(bad(
                "RANK",
                &rank_s,
                &format!("must be below WORLD_SIZE={world_size}"),
            ));
        }
        let local_rank = match get("LOCAL_RANK") {
            Some(v) => parse("LOCAL_RANK", &v)?,
            None => rank,
        };
        if world_size == 1 {
            return Ok(World {
                local_rank,
                ..World::single()
            });
        }
        let why = |var: &str| format!("WORLD_SIZE={world_size}: the workers meet at {var}");
        let master_addr = get("MASTER_ADDR").ok_or_else(|| DistError::MissingVar {
            var: "MASTER_ADDR",
            why: why("MASTER_ADDR:MASTER_PORT"),
        })?;
        let port_s = get("MASTER_PORT").ok_or_else(|| DistError::MissingVar {
            var: "MASTER_PORT",
            why: why("MASTER_ADDR:MASTER_PORT"),
        })?;
        let master_port: u16 = parse("MASTER_PORT", &port_s)?;
        if master_port == 0 {
            return Err(bad("MASTER_PORT", &port_s, "port 0 cannot be connected to"));
        }
        Ok(World {
            rank,
            world_size,
            local_rank,
            master_addr: master_addr.trim().to_string(),
            master_port,
        })
    }
}

fn bad(var: &'static str, value: &str, reason: &str) -> DistError {
    DistError::BadVar {
        var,
        value: value.to_string(),
        reason: reason.to_string(),
    }
}

fn parse<T: std::str::FromStr>(var: &'static str, value: &str) -> Result<T, DistError>
where
    T::Err: std::fmt::Display,
{
    value
        .trim()
        .parse()
        .map_err(|e: T::Err| bad(var, value, &format!("not a number in range ({e})")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn world(vars: &[(&str, &str)]) -> Result<World, DistError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        World::from_vars(|k| map.get(k).cloned())
    }

    const FULL: [(&str, &str); 5] = [
        ("RANK", "2"),
        ("WORLD_SIZE", "4"),
        ("LOCAL_RANK", "0"),
        ("MASTER_ADDR", "10.0.0.7"),
        ("MASTER_PORT", "29500"),
    ];

    #[test]
    fn no_variables_is_a_single_process() {
        let w = world(&[]).unwrap();
        assert_eq!(w, World::single());
        assert!(!w.is_distributed() && w.is_writer());
    }

    #[test]
    fn torchrun_variables_are_read() {
        let w = world(&FULL).unwrap();
        assert_eq!(
            (w.rank, w.world_size, w.local_rank, w.master()),
            (2, 4, 0, "10.0.0.7:29500".to_string())
        );
        assert!(w.is_distributed() && !w.is_writer());
    }

    #[test]
    fn each_missing_variable_is_named() {
        for var in ["RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"] {
            let vars: Vec<_> = FULL.iter().copied().filter(|(k, _)| *k != var).collect();
            let e = world(&vars).unwrap_err();
            assert!(
                matches!(&e, DistError::MissingVar { var: v, .. } if *v == var),
                "{var}: {e}"
            );
            assert!(e.to_string().contains(var), "{e}");
        }
        // LOCAL_RANK defaults to RANK.
        let vars: Vec<_> = FULL
            .iter()
            .copied()
            .filter(|(k, _)| *k != "LOCAL_RANK")
            .collect();
        assert_eq!(world(&vars).unwrap().local_rank, 2);
    }

    #[test]
    fn bad_values_are_named() {
        let cases = [
            ("RANK", "two", "RANK"),
            ("RANK", "4", "below WORLD_SIZE=4"),
            ("WORLD_SIZE", "0", "at least 1"),
            ("WORLD_SIZE", "-1", "WORLD_SIZE"),
            ("LOCAL_RANK", "x", "LOCAL_RANK"),
            ("MASTER_PORT", "70000", "MASTER_PORT"),
            ("MASTER_PORT", "0", "port 0"),
        ];
        for (var, value, needle) in cases {
            let vars: Vec<_> = FULL
                .iter()
                .map(|&(k, v)| (k, if k == var { value } else { v }))
                .collect();
            let e = world(&vars).unwrap_err().to_string();
            assert!(e.contains(var) && e.contains(needle), "{var}={value}: {e}");
        }
    }

    #[test]
    fn world_size_one_needs_no_master() {
        let w = world(&[("RANK", "0"), ("WORLD_SIZE", "1")]).unwrap();
        assert!(!w.is_distributed());
    }
}

//! The rendezvous: rank 0 listens on `MASTER_ADDR:MASTER_PORT`, every other rank connects
//! (retrying with backoff until a deadline) and sends its rank; once all have joined, rank 0
//! sends each the same blob (the 128-byte NCCL unique id of a GPU run; empty for the CPU).
//! The connections stay open: [`super::TcpComm`] runs its collectives over them.
//!
//! Every step has a deadline; a rank that never connects, or a peer that dies, gives an error
//! naming the rank and the time waited.

use super::wire::{self, Header, Kind, VERSION};
use super::{DistError, World};
use std::io::ErrorKind;
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// Deadlines of the rendezvous and of each collective.
#[derive(Clone, Copy, Debug)]
pub struct RendezvousConfig {
    /// How long rank 0 waits for every rank to join, and the others keep retrying to connect.
    pub join_timeout: Duration,
    /// How long one collective may wait for a peer (covers the slowest rank's compute between
    /// two collectives; a dead peer is seen at once, as a closed connection).
    pub op_timeout: Duration,
}

impl Default for RendezvousConfig {
    fn default() -> Self {
        RendezvousConfig {
            join_timeout: Duration::from_secs(120),
            op_timeout: Duration::from_secs(900),
        }
    }
}

impl RendezvousConfig {
    /// The defaults, with `LEXP_DIST_JOIN_TIMEOUT_S` and `LEXP_DIST_TIMEOUT_S` (seconds)
    /// overriding the join and collective timeouts when set to a positive number.
    pub fn from_env() -> RendezvousConfig {
        let secs = |k: &str| {
            std::env::var(k)
                .ok()
                .and_then(|v| v.trim().parse::<f64>().ok())
                .filter(|s| s.is_finite() && *s > 0.0)
                .map(Duration::from_secs_f64)
        };
        let d = RendezvousConfig::default();
        RendezvousConfig {
            join_timeout: secs("LEXP_DIST_JOIN_TIMEOUT_S").unwrap_or(d.join_timeout),
            op_timeout: secs("LEXP_DIST_TIMEOUT_S").unwrap_or(d.op_timeout),
        }
    }
}

/// The connections of a joined group: rank 0 holds one per other rank, the others one to
/// rank 0.
pub struct Group {
    pub(crate) world: World,
    /// Indexed by peer rank (`None` for this rank, and for the non-root ranks on a non-root).
    pub(crate) links: Vec<Option<TcpStream>>,
    pub(crate) op_timeout: Duration,
}

impl Group {
    /// This process's world.
    pub fn world(&self) -> &World {
        &self.world
    }
}

/// Rank 0's listening socket on `MASTER_ADDR:MASTER_PORT` (bind it before starting the other
/// ranks when the port is chosen by the OS, as tests do).
pub fn listen(world: &World) -> Result<TcpListener, DistError> {
    TcpListener::bind((world.master_addr.as_str(), world.master_port)).map_err(|source| {
        DistError::Listen {
            addr: world.master(),
            source,
        }
    })
}

/// Joins the group of `world`: rank 0 listens on `MASTER_ADDR:MASTER_PORT` (or on
/// `listener`, when given) and broadcasts `blob`; the others connect and receive it. Returns
/// the group and the blob. A world of one returns at once.
pub fn rendezvous(
    world: &World,
    listener: Option<TcpListener>,
    blob: &[u8],
    config: &RendezvousConfig,
) -> Result<(Group, Vec<u8>), DistError> {
    let mut group = Group {
        world: world.clone(),
        links: (0..world.world_size).map(|_| None).collect(),
        op_timeout: config.op_timeout,
    };
    if world.world_size == 1 {
        return Ok((group, blob.to_vec()));
    }
    if world.rank == 0 {
        let listener = match listener {
            Some(l) => l,
            None => listen(world)?,
        };
        accept_all(&mut group, &listener, config)?;
        broadcast_blob(&mut group, blob)?;
        Ok((group, blob.to_vec()))
    } else {
        let blob = join_root(&mut group, config)?;
        Ok((group, blob))
    }
}

/// Rank 0: accepts connections until every rank has introduced itself or the join deadline
/// passes.
fn accept_all(
    group: &mut Group,
    listener: &TcpListener,
    config: &RendezvousConfig,
) -> Result<(), DistError> {
    let t0 = Instant::now();
    let deadline = t0 + config.join_timeout;
    let n = group.world.world_size;
    let nonblocking = |e| DistError::Listen {
        addr: group.world.master(),
        source: e,
    };
    listener.set_nonblocking(true).map_err(nonblocking)?;
    let mut joined = 1;
    while joined < n {
        if Instant::now() >= deadline {
            let missing = (1..n).filter(|&r| group.links[r].is_none()).collect();
            return Err(DistError::Missing {
                missing,
                world_size: n,
                elapsed: t0.elapsed(),
            });
        }
        let (mut stream, from) = match listener.accept() {
            Ok(c) => c,
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            Err(e) => {
                return Err(DistError::Listen {
                    addr: group.world.master(),
                    source: e,
                })
            }
        };
        // A stranger that connects and says nothing must not stall the others: its hello has
        // a short deadline of its own.
        let hello_deadline = deadline.min(Instant::now() + Duration::from_secs(10));
        match read_hello(&mut stream, hello_deadline) {
            Ok((rank, size)) => {
                if size != n as u64 || rank == 0 || rank >= n as u64 {
                    return Err(DistError::Mismatch {
                        rank: 0,
                        peer: rank as usize,
                        detail: format!(
                            "a worker from {from} says it is rank {rank} of {size}, but this \
                             world has {n} ranks"
                        ),
                    });
                }
                let r = rank as usize;
                if group.links[r].is_some() {
                    return Err(DistError::Mismatch {
                        rank: 0,
                        peer: r,
                        detail: format!("two workers claim rank {r} (the second from {from})"),
                    });
                }
                tracing::debug!("rendezvous: rank {r} joined from {from}");
                group.links[r] = Some(stream);
                joined += 1;
            }
            Err(e) => tracing::warn!("rendezvous: ignoring a connection from {from}: {e}"),
        }
    }
    Ok(())
}

fn read_hello(stream: &mut TcpStream, deadline: Instant) -> Result<(u64, u64), String> {
    stream.set_nonblocking(false).map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    let h = wire::recv_header(stream, deadline).map_err(|e| e.to_string())?;
    let mut v = [0u8; 4];
    wire::read_exact_by(stream, &mut v, deadline).map_err(|e| e.to_string())?;
    let version = u32::from_le_bytes(v);
    if h.kind != Kind::Hello || version != VERSION {
        return Err(format!(
            "expected a hello of protocol version {VERSION}, got {:?} of version {version}",
            h.kind
        ));
    }
    Ok((h.seq, h.len))
}

/// Rank 0: sends the blob to every other rank, in rank order.
fn broadcast_blob(group: &mut Group, blob: &[u8]) -> Result<(), DistError> {
    let t0 = Instant::now();
    let deadline = t0 + group.op_timeout;
    for (peer, link) in group.links.iter_mut().enumerate() {
        let Some(stream) = link else { continue };
        let header = Header {
            kind: Kind::Blob,
            seq: 0,
            len: blob.len() as u64,
        };
        wire::send(stream, header, blob, deadline).map_err(|e| DistError::Peer {
            rank: 0,
            peer,
            what: "rendezvous (sending the blob)".into(),
            elapsed: t0.elapsed(),
            detail: e.to_string(),
        })?;
    }
    Ok(())
}

/// A non-root rank: connects to rank 0 (retrying with backoff), introduces itself, and reads
/// the blob.
fn join_root(group: &mut Group, config: &RendezvousConfig) -> Result<Vec<u8>, DistError> {
    let world = group.world.clone();
    let t0 = Instant::now();
    let deadline = t0 + config.join_timeout;
    let fail = |what: &str, detail: String| DistError::Peer {
        rank: world.rank,
        peer: 0,
        what: format!("rendezvous ({what} {})", world.master()),
        elapsed: t0.elapsed(),
        detail,
    };
    let mut backoff = Duration::from_millis(10);
    let mut stream = loop {
        let attempt = resolve(&world).and_then(|addr| {
            let left = deadline.saturating_duration_since(Instant::now());
            TcpStream::connect_timeout(
                &addr,
                left.clamp(Duration::from_millis(1), Duration::from_secs(5)),
            )
            .map_err(|e| e.to_string())
        });
        match attempt {
            Ok(s) => break s,
            Err(e) if Instant::now() >= deadline => {
                return Err(fail("connecting to", format!("gave up: {e}")));
            }
            Err(_) => {
                std::thread::sleep(backoff.min(deadline.saturating_duration_since(Instant::now())));
                backoff = (backoff * 2).min(Duration::from_millis(500));
            }
        }
    };
    let _ = stream.set_nodelay(true);
    let hello = Header {
        kind: Kind::Hello,
        seq: world.rank as u64,
        len: world.world_size as u64,
    };
    let op_deadline = Instant::now() + config.op_timeout.min(config.join_timeout);
    wire::send(&mut stream, hello, &VERSION.to_le_bytes(), op_deadline)
        .map_err(|e| fail("introducing itself to", e.to_string()))?;
    // Rank 0 answers once every rank has joined: wait as long as it waits for them.
    let blob_deadline = Instant::now() + config.join_timeout + Duration::from_secs(5);
    let h = wire::recv_header(&mut stream, blob_deadline)
        .map_err(|e| fail("waiting for the blob from", e.to_string()))?;
    if h.kind != Kind::Blob || h.len > (1 << 20) {
        return Err(fail(
            "waiting for the blob from",
            format!("unexpected {:?} message of {} bytes", h.kind, h.len),
        ));
    }
    let mut blob = vec![0u8; h.len as usize];
    wire::read_exact_by(&mut stream, &mut blob, blob_deadline)
        .map_err(|e| fail("reading the blob from", e.to_string()))?;
    group.links[0] = Some(stream);
    Ok(blob)
}

fn resolve(world: &World) -> Result<SocketAddr, String> {
    (world.master_addr.as_str(), world.master_port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {}: {e}", world.master()))?
        .next()
        .ok_or_else(|| format!("{} resolves to no address", world.master()))
}

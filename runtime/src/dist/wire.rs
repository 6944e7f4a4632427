//! Framing over TCP with deadlines: every read and write of the rendezvous and the
//! collectives ends by a deadline (never a hang), and a message header lets both sides check
//! that they are in the same collective.

use std::io::{self, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// First bytes of every message.
pub(crate) const MAGIC: [u8; 4] = *b"LXDP";
/// Protocol version, sent at the rendezvous.
pub(crate) const VERSION: u32 = 1;
/// Bytes of a [`Header`].
pub(crate) const HEADER_LEN: usize = 4 + 1 + 8 + 8;

/// What a message carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Kind {
    /// A non-root rank introduces itself.
    Hello = 1,
    /// Rank 0's blob at the end of the rendezvous.
    Blob = 2,
    /// f32 sum all-reduce.
    SumF32 = 3,
    /// f64 sum all-reduce.
    SumF64 = 4,
    /// Barrier.
    Barrier = 5,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Hello,
            2 => Kind::Blob,
            3 => Kind::SumF32,
            4 => Kind::SumF64,
            5 => Kind::Barrier,
            _ => return None,
        })
    }
}

/// A message header: kind, sequence number of the collective, payload length in elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    pub kind: Kind,
    pub seq: u64,
    pub len: u64,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..4].copy_from_slice(&MAGIC);
        b[4] = self.kind as u8;
        b[5..13].copy_from_slice(&self.seq.to_le_bytes());
        b[13..21].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Header, String> {
        if b[..4] != MAGIC {
            return Err(format!(
                "not a lexp message (first bytes {:02x?}; another program on the port?)",
                &b[..4]
            ));
        }
        let kind = Kind::from_u8(b[4]).ok_or_else(|| format!("unknown message kind {}", b[4]))?;
        let word = |r: std::ops::Range<usize>| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[r]);
            u64::from_le_bytes(w)
        };
        Ok(Header {
            kind,
            seq: word(5..13),
            len: word(13..21),
        })
    }
}

/// Time left until `deadline`, at least 1 ms (a zero timeout means "none" to the socket API).
fn remaining(deadline: Instant) -> io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::Error::new(ErrorKind::TimedOut, "deadline passed"));
    }
    Ok(left.max(Duration::from_millis(1)))
}

fn timed_out(e: io::Error) -> io::Error {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => {
            io::Error::new(ErrorKind::TimedOut, "timed out waiting for the peer")
        }
        _ => e,
    }
}

/// Reads exactly `buf.len()` bytes before `deadline` (`UnexpectedEof` when the peer closed
/// the connection, `TimedOut` past the deadline).
pub(crate) fn read_exact_by(
    s: &mut TcpStream,
    buf: &mut [u8],
    deadline: Instant,
) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        s.set_read_timeout(Some(remaining(deadline)?))?;
        match s.read(&mut buf[done..]) {
            Ok(0) => {
                return Err(io::Error::new(
                    ErrorKind::UnexpectedEof,
                    "the peer closed the connection (did it exit?)",
                ))
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(timed_out(e)),
        }
    }
    Ok(())
}

/// Writes all of `buf` before `deadline`.
pub(crate) fn write_all_by(s: &mut TcpStream, buf: &[u8], deadline: Instant) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        s.set_write_timeout(Some(remaining(deadline)?))?;
        match s.write(&buf[done..]) {
            Ok(0) => {
                return Err(io::Error::new(
                    ErrorKind::WriteZero,
                    "the peer stopped reading",
                ))
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(timed_out(e)),
        }
    }
    Ok(())
}

/// Sends a header and its payload bytes.
pub(crate) fn send(
    s: &mut TcpStream,
    header: Header,
    payload: &[u8],
    deadline: Instant,
) -> io::Result<()> {
    let mut msg = Vec::with_capacity(HEADER_LEN + payload.len());
    msg.extend_from_slice(&header.encode());
    msg.extend_from_slice(payload);
    write_all_by(s, &msg, deadline)
}

/// Reads a header (its payload is read by the caller, who knows the element size).
pub(crate) fn recv_header(s: &mut TcpStream, deadline: Instant) -> io::Result<Header> {
    let mut b = [0u8; HEADER_LEN];
    read_exact_by(s, &mut b, deadline)?;
    Header::decode(&b).map_err(|e| io::Error::new(ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_rejects_foreign_bytes() {
        let h = Header {
            kind: Kind::SumF64,
            seq: 0x0102_0304_0506_0708,
            len: 12345,
        };
        assert_eq!(Header::decode(&h.encode()).unwrap(), h);
        let mut b = h.encode();
        b[0] = b'G';
        assert!(Header::decode(&b)
            .unwrap_err()
            .contains("not a lexp message"));
        let mut b = h.encode();
        b[4] = 99;
        assert!(Header::decode(&b).unwrap_err().contains("kind 99"));
    }
}

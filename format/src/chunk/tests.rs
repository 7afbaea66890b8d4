//! Tests of whole chunks: through the stream codec, the transcoder and the column decoders.

use super::tokens::{Long, Short};
use super::{expand_fast, ColumnDecoder, ColumnEncoding, FastEncoder, StreamDecoder, Transcoder};
use crate::{encode_stream, AllocKind, ChunkHeader, Cursor, EventKind, Item};

pub(crate) fn stream_chunk(header: ChunkHeader, items: &[Item]) -> Vec<u8> {
    encode_stream(&header, items)
}

/// The header and items of a framed `EVENTS_R` record.
pub(crate) fn rank_items(record: &[u8]) -> (ChunkHeader, Vec<Item>) {
    compressed_items(record, ColumnEncoding::Rank)
}

/// The header and items of a framed record of a compressed encoding, which must be `encoding`.
fn compressed_items(record: &[u8], encoding: ColumnEncoding) -> (ChunkHeader, Vec<Item>) {
    let crate::Next::Record(r) = crate::next_record(record, 0) else {
        panic!("not a record")
    };
    assert_eq!(ColumnEncoding::of_record(r.kind), Some(encoding));
    let mut c = Cursor::new(r.payload);
    let h = ChunkHeader::decode(&mut c).unwrap();
    let mut z = ColumnDecoder::new(c.rest(), &h, encoding).unwrap();
    let mut items = Vec::new();
    while let Some(it) = z.next_item().unwrap() {
        items.push(it);
    }
    (h, items)
}

fn stream_items(stream: &[u8]) -> Vec<Item> {
    let mut c = Cursor::new(stream);
    let h = ChunkHeader::decode(&mut c).unwrap();
    let mut s = StreamDecoder::new(c.rest(), &h);
    let mut items = Vec::new();
    while let Some(it) = s.next_item().unwrap() {
        items.push(it);
    }
    items
}

#[test]
fn rank_round_trips_every_op() {
    let header = ChunkHeader {
        tid: 7,
        base_seq: 100,
        base_time: 5,
    };
    let ev = |seq, op| Item::Event {
        seq,
        time: 5 + seq / 3,
        kind: op,
    };
    let alloc = |kind, addr, size, stack| EventKind::Alloc {
        kind,
        addr,
        size,
        stack,
    };
    let items = vec![
        Item::Node {
            id: 1,
            parent: 0,
            ip: 0x5555_0000_1234,
        },
        Item::Node {
            id: 2,
            parent: 1,
            ip: 0x5555_0000_1000,
        },
        ev(100, alloc(AllocKind::Malloc, 0x1000, 24, 2)),
        ev(101, alloc(AllocKind::Calloc, 0x2000, 100, 1)),
        ev(103, EventKind::Free { addr: 0x1000 }),
        ev(104, alloc(AllocKind::Malloc, 0x1000, 16, 2)), // reuses the freed address
        ev(105, EventKind::ReallocFree { addr: 0x2000 }),
        ev(106, alloc(AllocKind::Realloc, 0x9000, 500, 1)),
        ev(107, EventKind::ReallocFree { addr: 0x9000 }),
        ev(108, EventKind::ReallocFailed),
        ev(109, EventKind::Free { addr: 0x7777 }), // allocated in another chunk
        Item::Node {
            id: 9,
            parent: 2,
            ip: 0x7f00_0000_0042,
        },
        ev(110, alloc(AllocKind::PosixMemalign, 0x7777, 64, 9)),
        ev(111, alloc(AllocKind::RustAlloc, 0x1, 0, 0)),
    ];
    let stream = stream_chunk(header, &items);
    assert_eq!(stream_items(&stream), items);

    let mut out = Vec::new();
    Transcoder::new().transcode(&stream, 1, &mut out).unwrap();
    let (h2, back) = rank_items(&out);
    assert_eq!(h2, header);
    assert_eq!(back, items);

    // The fast encoding keeps the stream itself: every op back, and the payload for the
    // transcoder byte for byte.
    let mut fast = Vec::new();
    FastEncoder::new().encode(&stream, -5, &mut fast).unwrap();
    let (h3, back) = compressed_items(&fast, ColumnEncoding::ZstdStream);
    assert_eq!(h3, header);
    assert_eq!(back, items);
    let crate::Next::Record(r) = crate::next_record(&fast, 0) else {
        panic!("not a record")
    };
    assert_eq!(expand_fast(r.payload).unwrap(), stream);
}

#[test]
fn tokens_round_trip_at_every_bit_length() {
    let mut values = vec![0u64, 1, 15, 16, 17, 19, 20, 31, 32, u64::MAX, u64::MAX - 1];
    for bits in 5..64 {
        let b = 1u64 << bits;
        values.extend([b - 1, b, b + 1, b | (b >> 1), b | (b >> 2) | 1]);
    }
    for &v in &values {
        let (t, n, x) = Long::split(v);
        assert_eq!(n, Long::extra(t), "{v}");
        assert_eq!(x >> n, 0, "{v}");
        assert_eq!(Long::value(t, x), v, "{v}");
        let (t, n, x) = Short::split(v);
        assert!(t < 128, "{v}");
        assert_eq!(n, Short::extra(t), "{v}");
        assert_eq!(x >> n, 0, "{v}");
        assert_eq!(Short::value(t, x), v, "{v}");
    }
    // And through a chunk: sizes and stack ids of every magnitude, addresses far apart.
    let header = ChunkHeader {
        tid: 3,
        base_seq: 0,
        base_time: 0,
    };
    let items: Vec<Item> = values
        .iter()
        .enumerate()
        .map(|(i, &v)| Item::Event {
            seq: 1 + i as u64 * 1000,
            time: i as u64 * 77,
            kind: EventKind::Alloc {
                kind: AllocKind::Malloc,
                addr: v.rotate_left(17) ^ 0x5555,
                size: v,
                stack: (v >> 3) as u32,
            },
        })
        .collect();
    let mut out = Vec::new();
    Transcoder::new()
        .transcode(&stream_chunk(header, &items), 3, &mut out)
        .unwrap();
    let crate::Next::Record(r) = crate::next_record(&out, 0) else {
        panic!("not a record")
    };
    let mut c = Cursor::new(r.payload);
    let h = ChunkHeader::decode(&mut c).unwrap();
    let mut z = ColumnDecoder::new(c.rest(), &h, ColumnEncoding::Rank).unwrap();
    let mut back = Vec::new();
    while let Some(it) = z.next_item().unwrap() {
        back.push(it);
    }
    assert_eq!(back, items);
}

#[test]
fn stream_items_read_the_same_far_from_the_end_and_near_it() {
    // Values of every varint length (1 to 10 bytes), so the unchecked reads far from the
    // end meet each case, their fallback to byte-wise reading included; the last items are
    // read with bounds checks.
    let header = ChunkHeader {
        tid: 3,
        base_seq: 1,
        base_time: 0,
    };
    let mut items = Vec::new();
    let (mut seq, mut time) = (1u64, 0u64);
    for (i, bits) in (0..64u32).cycle().take(400).enumerate() {
        let v = (1u64 << bits) | (i as u64 & 1);
        seq = seq.wrapping_add(v);
        time = time.wrapping_add(v >> 3);
        let op = match i % 4 {
            0 => EventKind::Alloc {
                kind: AllocKind::Malloc,
                addr: v.rotate_left(7),
                size: v,
                stack: (v >> 1) as u32,
            },
            1 => EventKind::Free { addr: !v },
            2 => EventKind::ReallocFailed,
            _ => EventKind::ReallocFree { addr: v },
        };
        items.push(Item::Event {
            seq,
            time,
            kind: op,
        });
        if i % 7 == 0 {
            items.push(Item::Node {
                id: v,
                parent: u64::MAX - v,
                ip: v ^ 0x5555,
            });
        }
    }
    let stream = stream_chunk(header, &items);
    assert_eq!(stream_items(&stream), items);
    // Damaged or cut short: errors or other items, never a read past the end.
    let read_all = |bytes: &[u8]| {
        let mut c = Cursor::new(bytes);
        if let Ok(h) = ChunkHeader::decode(&mut c) {
            let mut s = StreamDecoder::new(c.rest(), &h);
            while let Ok(Some(_)) = s.next_item() {}
        }
    };
    for i in (0..stream.len()).step_by(3) {
        for flip in [0x80u8, 0xff] {
            let mut d = stream.clone();
            d[i] ^= flip;
            read_all(&d);
        }
        read_all(&stream[..i]);
    }
}

#[test]
fn damaged_rank_and_fast_chunks_are_errors_not_panics() {
    let header = ChunkHeader {
        tid: 1,
        base_seq: 1,
        base_time: 0,
    };
    let items: Vec<Item> = (0..200u64)
        .map(|i| Item::Event {
            seq: 1 + i,
            time: 0,
            kind: if i % 2 == 0 {
                EventKind::Alloc {
                    kind: AllocKind::Malloc,
                    addr: 0x1000 + i * 16,
                    size: i,
                    stack: 0,
                }
            } else {
                EventKind::Free {
                    addr: 0x1000 + (i - 1) * 16,
                }
            },
        })
        .collect();
    let mut rank = Vec::new();
    Transcoder::new()
        .transcode(&stream_chunk(header, &items), 1, &mut rank)
        .unwrap();
    let mut fast = Vec::new();
    FastEncoder::new()
        .encode(&stream_chunk(header, &items), -5, &mut fast)
        .unwrap();
    for (out, encoding) in [
        (rank, ColumnEncoding::Rank),
        (fast, ColumnEncoding::ZstdStream),
    ] {
        damage_never_panics(&out, encoding);
    }
}

/// Every byte of a framed chunk flipped three ways, and the chunk cut at every byte: decoding
/// gives errors, never a panic.
fn damage_never_panics(out: &[u8], encoding: ColumnEncoding) {
    let decode_all = |d: &[u8]| {
        if let crate::Next::Record(r) = crate::next_record(d, 0) {
            let mut c = Cursor::new(r.payload);
            if let Ok(h) = ChunkHeader::decode(&mut c) {
                if let Ok(mut z) = ColumnDecoder::new(c.rest(), &h, encoding) {
                    for _ in 0..1000 {
                        match z.next_item() {
                            Ok(Some(_)) => {}
                            _ => break,
                        }
                    }
                }
            }
        }
    };
    let crate::Next::Record(r) = crate::next_record(out, 0) else {
        panic!("not a record")
    };
    for cut in 0..r.payload.len() {
        // Framed again, so that the cut payload itself is decoded.
        let mut d = Vec::new();
        crate::put_record(&mut d, r.kind, &r.payload[..cut]);
        decode_all(&d);
    }
    for i in 0..out.len() {
        for flip in [0x01u8, 0x80, 0xff] {
            let mut d = out.to_vec();
            d[i] ^= flip;
            decode_all(&d);
        }
    }
}

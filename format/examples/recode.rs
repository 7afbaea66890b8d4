//! Size study tool: re-encodes every events chunk of a capture with today's encoder, checks that
//! each decodes back to the same items, and prints the sizes before and after.
//!
//!     cargo run --release -p memtrack-format --example recode -- churn.cap
use memtrack_format::chunk::{encode_stream, Compact, CompactEvents, Compactor, Item};
use memtrack_format::*;

fn decode(payload: &[u8], encoding: Compact) -> (ChunkHeader, Vec<Item>) {
    let mut c = Cursor::new(payload);
    let h = ChunkHeader::decode(&mut c).expect("chunk header");
    let mut z = CompactEvents::new(c.rest(), &h, encoding).expect("chunk");
    let mut items = Vec::new();
    while let Some(it) = z.next_item().expect("item") {
        items.push(it);
    }
    (h, items)
}

fn main() {
    let path = std::env::args().nth(1).expect("usage: recode CAPTURE");
    let data = std::fs::read(&path).expect("read the capture");
    let (_, mut off) = Header::decode(&data).expect("capture header");
    let mut compactor = Compactor::new();
    let (mut events, mut chunks, mut before, mut after, mut same) =
        (0usize, 0usize, 0usize, 0usize, 0usize);
    let mut out = Vec::new();
    while let Next::Record(r) = next_record(&data, off) {
        let end = r.payload.as_ptr() as usize - data.as_ptr() as usize + r.payload.len();
        let record_len = end - off;
        off = end;
        let encoding = match r.kind {
            record::EVENTS_Z => Compact::Z,
            record::EVENTS_T => Compact::T,
            record::EVENTS_R => Compact::R,
            _ => continue,
        };
        let (h, items) = decode(r.payload, encoding);
        out.clear();
        compactor
            .compact(&encode_stream(&h, &items), 1, &mut out)
            .expect("compact");
        let Next::Record(again) = next_record(&out, 0) else {
            panic!("compact wrote no record")
        };
        assert!(
            decode(again.payload, Compact::R) == (h, items.clone()),
            "chunk {chunks} does not round-trip"
        );
        if encoding == Compact::R && out[..] == data[end - record_len..end] {
            same += 1;
        }
        chunks += 1;
        events += items
            .iter()
            .filter(|i| matches!(i, Item::Event { .. }))
            .count();
        before += record_len;
        after += out.len();
    }
    let per = |b: usize| b as f64 / events.max(1) as f64;
    println!("{chunks} chunks, {events} events");
    println!("as written: {before} bytes, {:.3} bytes/event", per(before));
    println!("re-encoded: {after} bytes, {:.3} bytes/event", per(after));
    println!("{same} chunks of the rank encoding re-encoded to the same bytes");
}

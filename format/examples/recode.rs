//! Size study tool: re-encodes every events chunk of a capture with today's encoder, checks that
//! each decodes back to the same items, and prints the sizes before and after.
//!
//!     cargo run --release -p memtrack-format --example recode -- churn.cap [--time] [--time-decode]
//!
//! `--time` also times the transcoder alone (best of 5 passes over all chunks), as the
//! tracker's writer thread runs it; `--time-decode` the chunks' decoding, as the reader's
//! workers run it.
use memtrack_format::*;

fn decode(payload: &[u8], encoding: ColumnEncoding) -> (ChunkHeader, Vec<Item>) {
    let mut c = Cursor::new(payload);
    let h = ChunkHeader::decode(&mut c).expect("chunk header");
    let mut z = ColumnDecoder::new(c.rest(), &h, encoding).expect("chunk");
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
    let mut transcoder = Transcoder::new();
    let (mut events, mut chunks, mut before, mut after, mut same, mut nodes) =
        (0usize, 0usize, 0usize, 0usize, 0usize, 0usize);
    let mut out = Vec::new();
    let mut streams = Vec::new();
    while let Next::Record(r) = next_record(&data, off) {
        let end = r.payload.as_ptr() as usize - data.as_ptr() as usize + r.payload.len();
        let record_len = end - off;
        off = end;
        let encoding = match r.kind {
            record::EVENTS_Z => ColumnEncoding::Varint,
            record::EVENTS_T => ColumnEncoding::Token,
            record::EVENTS_R => ColumnEncoding::Rank,
            _ => continue,
        };
        let (h, items) = decode(r.payload, encoding);
        let stream = encode_stream(&h, &items);
        out.clear();
        transcoder
            .transcode(&stream, 1, &mut out)
            .expect("transcode");
        streams.push(stream);
        let Next::Record(again) = next_record(&out, 0) else {
            panic!("transcode wrote no record")
        };
        assert!(
            decode(again.payload, ColumnEncoding::Rank) == (h, items.clone()),
            "chunk {chunks} does not round-trip"
        );
        if encoding == ColumnEncoding::Rank && out[..] == data[end - record_len..end] {
            same += 1;
        }
        chunks += 1;
        events += items
            .iter()
            .filter(|i| matches!(i, Item::Event { .. }))
            .count();
        nodes += items
            .iter()
            .filter(|i| matches!(i, Item::Node { .. }))
            .count();
        before += record_len;
        after += out.len();
    }
    let per = |b: usize| b as f64 / events.max(1) as f64;
    println!("{chunks} chunks, {events} events, {nodes} stack nodes");
    println!("as written: {before} bytes, {:.3} bytes/event", per(before));
    println!("re-encoded: {after} bytes, {:.3} bytes/event", per(after));
    println!("{same} chunks of the rank encoding re-encoded to the same bytes");
    if std::env::args().any(|a| a == "--time-decode") {
        let mut records = Vec::new();
        let (_, mut off) = Header::decode(&data).expect("capture header");
        while let Next::Record(r) = next_record(&data, off) {
            off = r.payload.as_ptr() as usize - data.as_ptr() as usize + r.payload.len();
            let encoding = match r.kind {
                record::EVENTS_Z => ColumnEncoding::Varint,
                record::EVENTS_T => ColumnEncoding::Token,
                record::EVENTS_R => ColumnEncoding::Rank,
                _ => continue,
            };
            records.push((r.payload, encoding));
        }
        let mut best = f64::MAX;
        let mut n = 0usize;
        for _ in 0..5 {
            let start = std::time::Instant::now();
            n = 0;
            for &(payload, encoding) in &records {
                let mut c = Cursor::new(payload);
                let h = ChunkHeader::decode(&mut c).expect("chunk header");
                let mut z = ColumnDecoder::new(c.rest(), &h, encoding).expect("chunk");
                while let Some(it) = z.next_item().expect("item") {
                    n += matches!(it, Item::Event { .. }) as usize;
                }
            }
            best = best.min(start.elapsed().as_secs_f64());
        }
        println!(
            "decoding: {:.3} s, {:.1} ns/event (best of 5, one thread)",
            best,
            best * 1e9 / n.max(1) as f64
        );
    }
    if std::env::args().any(|a| a == "--time") {
        let mut best = f64::MAX;
        for _ in 0..5 {
            let start = std::time::Instant::now();
            for stream in &streams {
                out.clear();
                transcoder
                    .transcode(stream, 1, &mut out)
                    .expect("transcode");
            }
            best = best.min(start.elapsed().as_secs_f64());
        }
        println!(
            "transcoding: {:.3} s, {:.1} ns/event (best of 5)",
            best,
            best * 1e9 / events.max(1) as f64
        );
    }
}

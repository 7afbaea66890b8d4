//! Export to pprof's `profile.proto` (gzip-compressed), with the sample types of a Go heap
//! profile, so that `go tool pprof`, Pyroscope, Parca and Google Cloud Profiler read memtrack's
//! captures.
//!
//! Each distinct stack is a sample with four values: `alloc_objects` and `alloc_space` (every
//! allocation made by it, the allocated view), `inuse_objects` and `inuse_space` (what was live
//! in the chosen view: at the peak, or at exit). Locations are code addresses with their
//! symbolized frames (inlined ones as lines of their own, innermost first), functions carry
//! their file, and mappings are the capture's modules.

use crate::views::View;
use crate::{Capture, StackTable, Symbolizer, ViewSites};
use memtrack_format::put_uvarint;
use std::collections::HashMap;

/// A protobuf message being written (field numbers of `profile.proto`).
#[derive(Default)]
struct Msg(Vec<u8>);

impl Msg {
    fn key(&mut self, field: u64, wire: u64) {
        put_uvarint(&mut self.0, (field << 3) | wire);
    }
    fn uint(&mut self, field: u64, v: u64) {
        if v != 0 {
            self.key(field, 0);
            put_uvarint(&mut self.0, v);
        }
    }
    fn int(&mut self, field: u64, v: i64) {
        self.uint(field, v as u64);
    }
    fn bool(&mut self, field: u64, v: bool) {
        self.uint(field, v as u64);
    }
    fn bytes(&mut self, field: u64, b: &[u8]) {
        self.key(field, 2);
        put_uvarint(&mut self.0, b.len() as u64);
        self.0.extend_from_slice(b);
    }
    fn msg(&mut self, field: u64, m: Msg) {
        self.bytes(field, &m.0);
    }
    fn packed(&mut self, field: u64, vals: impl IntoIterator<Item = u64>) {
        let mut p = Vec::new();
        for v in vals {
            put_uvarint(&mut p, v);
        }
        if !p.is_empty() {
            self.bytes(field, &p);
        }
    }
}

/// The string table: index 0 is the empty string.
struct Strings {
    list: Vec<String>,
    index: HashMap<String, u64>,
}

impl Strings {
    fn new() -> Self {
        Strings {
            list: vec![String::new()],
            index: HashMap::from([(String::new(), 0)]),
        }
    }
    fn id(&mut self, s: &str) -> u64 {
        if let Some(&i) = self.index.get(s) {
            return i;
        }
        let i = self.list.len() as u64;
        self.list.push(s.to_string());
        self.index.insert(s.to_string(), i);
        i
    }
}

fn value_type(strings: &mut Strings, ty: &str, unit: &str) -> Msg {
    let mut m = Msg::default();
    m.uint(1, strings.id(ty));
    m.uint(2, strings.id(unit));
    m
}

/// One stack's four values in a profile (the sample types of a Go heap profile). A profile is
/// written from these whatever they were taken from: a view of a full capture, an interval of
/// the periodic export, or (for captures that hold no event per allocation) weighted samples
/// and checkpoints.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StackValues {
    pub stack: u32,
    pub alloc_objects: u64,
    pub alloc_space: u64,
    pub inuse_objects: u64,
    pub inuse_space: u64,
}

impl StackValues {
    fn values(&self) -> [u64; 4] {
        [
            self.alloc_objects,
            self.alloc_space,
            self.inuse_objects,
            self.inuse_space,
        ]
    }
}

/// The time a profile covers (`time_nanos`, `duration_nanos`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProfileTime {
    pub start_unix_ns: u64,
    pub duration_ns: u64,
}

impl ProfileTime {
    /// The whole recording of `cap`.
    pub fn whole(cap: &Capture) -> ProfileTime {
        let start_unix_ns = cap
            .images
            .first()
            .map_or(cap.last_image().start_unix_ns, |h| h.start_unix_ns);
        let duration = cap.end.map(|e| cap.seconds(e.time)).unwrap_or(0.0);
        ProfileTime {
            start_unix_ns,
            duration_ns: (duration * 1e9) as u64,
        }
    }
}

/// One process's share of a profile: its capture, the values of its stacks (ids of `stacks`),
/// and, in a profile of several processes, a root frame (`label`) above its stacks and a `pid`
/// label on its samples.
pub struct Piece<'a> {
    pub cap: &'a Capture,
    pub values: Vec<StackValues>,
    pub stacks: &'a StackTable,
    pub label: Option<String>,
    pub pid: u32,
    pub sym: &'a mut Symbolizer,
}

/// The values of a view's export: `inuse_*` from `inuse`, `alloc_*` from every allocation
/// (every mapping, for a view of mapped memory). Also returns the allocated view, whose stack
/// table the values' ids refer to.
pub fn view_values(cap: &Capture, inuse: &ViewSites) -> (Vec<StackValues>, ViewSites) {
    let allocated = cap.view(if inuse.view.is_mapped() {
        View::MappedAllocated
    } else {
        View::Allocated
    });
    let mut values: HashMap<u32, StackValues> = HashMap::new();
    fn entry(values: &mut HashMap<u32, StackValues>, stack: u32) -> &mut StackValues {
        values.entry(stack).or_insert(StackValues {
            stack,
            ..Default::default()
        })
    }
    for s in &allocated.sites {
        let v = entry(&mut values, s.stack);
        v.alloc_objects += s.allocations;
        v.alloc_space += s.bytes;
    }
    for s in &inuse.sites {
        let v = entry(&mut values, s.stack);
        v.inuse_objects += s.allocations;
        v.inuse_space += s.bytes;
    }
    (values.into_values().collect(), allocated)
}

/// The uncompressed `profile.proto` bytes of `cap`, in-use values from `inuse`.
pub fn profile(cap: &Capture, inuse: View, sym: &mut Symbolizer) -> Vec<u8> {
    let live = cap.view(inuse);
    let (values, allocated) = view_values(cap, &live);
    profile_of(
        vec![Piece {
            cap,
            values,
            stacks: &allocated.stacks,
            label: None,
            pid: cap.header.pid,
            sym,
        }],
        ProfileTime::whole(cap),
        None,
    )
}

/// The uncompressed `profile.proto` bytes of one or more processes' values, covering `time`;
/// `note` is added to the comment that names the command.
pub fn profile_of(mut pieces: Vec<Piece<'_>>, time: ProfileTime, note: Option<&str>) -> Vec<u8> {
    let mut strings = Strings::new();
    let mut p = Msg::default();
    for (ty, unit) in [
        ("alloc_objects", "count"),
        ("alloc_space", "bytes"),
        ("inuse_objects", "count"),
        ("inuse_space", "bytes"),
    ] {
        let vt = value_type(&mut strings, ty, unit);
        p.msg(1, vt);
    }

    // Mappings: every module the capture recorded, once by load address.
    let mut mappings: Vec<(u64, u64, u64, String, String)> = Vec::new();
    for rec in pieces.iter().flat_map(|p| &p.cap.modules) {
        for m in &rec.modules {
            let lo = m
                .segments
                .iter()
                .map(|s| m.base.wrapping_add(s.vaddr))
                .min()
                .unwrap_or(m.base);
            let hi = m
                .segments
                .iter()
                .map(|s| m.base.wrapping_add(s.vaddr).wrapping_add(s.memsz))
                .max()
                .unwrap_or(m.base);
            if mappings.iter().any(|x| x.0 == lo && x.3 == m.path) {
                continue;
            }
            let build_id: String = m.build_id.iter().map(|b| format!("{b:02x}")).collect();
            let file_offset = lo.wrapping_sub(m.base);
            mappings.push((lo, hi, file_offset, m.path.clone(), build_id));
        }
    }
    let mapping_of = |addr: u64| {
        mappings
            .iter()
            .position(|m| addr >= m.0 && addr < m.1)
            .map(|i| i as u64 + 1)
            .unwrap_or(0)
    };

    let mut locations: HashMap<(usize, u64), u64> = HashMap::new();
    let mut location_msgs: Vec<Msg> = Vec::new();
    let mut functions: HashMap<(String, Option<String>), u64> = HashMap::new();
    let mut function_msgs: Vec<Msg> = Vec::new();
    let pid_key = strings.id("pid");
    for (piece_index, piece) in pieces.iter_mut().enumerate() {
        let sym = &mut *piece.sym;
        let mut stacks: Vec<(u32, [u64; 4])> =
            piece.values.iter().map(|v| (v.stack, v.values())).collect();
        stacks.sort_by_key(|(s, _)| *s);
        // The process's root frame: a location of its own, with no address.
        let root = piece.label.as_ref().map(|label| {
            let fid = function_msgs.len() as u64 + 1;
            let mut fm = Msg::default();
            fm.uint(1, fid);
            let name = strings.id(label);
            fm.uint(2, name);
            fm.uint(3, name);
            function_msgs.push(fm);
            let id = location_msgs.len() as u64 + 1;
            let mut loc = Msg::default();
            loc.uint(1, id);
            let mut line = Msg::default();
            line.uint(1, fid);
            loc.msg(4, line);
            location_msgs.push(loc);
            id
        });
        for (stack, v) in &stacks {
            // Python frames in place of the interpreter's evaluation loops, leaf first.
            let addrs = sym.merged_addrs(piece.stacks, *stack);
            // Addresses of two processes may hold different code.
            let a_key = |a: u64| (piece_index, a);
            let mut ids = Vec::with_capacity(addrs.len());
            for a in addrs {
                if let Some(&id) = locations.get(&a_key(a)) {
                    ids.push(id);
                    continue;
                }
                let id = location_msgs.len() as u64 + 1;
                let mut loc = Msg::default();
                loc.uint(1, id);
                if !memtrack_format::pyframe::is_python(a) {
                    loc.uint(2, mapping_of(a));
                    loc.uint(3, a);
                }
                // pprof wants the innermost (inlined) frame first; ours come outermost first.
                let python = memtrack_format::pyframe::is_python(a);
                for f in sym.frames(a).iter().rev() {
                    // pprof strips `<...>` from names as C++ template arguments, which would leave
                    // Python's `<module>`, `<listcomp>`, `f.<locals>.g` empty or cut: `(module)`.
                    let name = if python {
                        f.function.replace('<', "(").replace('>', ")")
                    } else {
                        f.function.clone()
                    };
                    let key = (name, f.file.clone());
                    let fid = match functions.get(&key) {
                        Some(&fid) => fid,
                        None => {
                            let fid = function_msgs.len() as u64 + 1;
                            let mut fm = Msg::default();
                            fm.uint(1, fid);
                            let name = strings.id(&key.0);
                            fm.uint(2, name);
                            fm.uint(3, name);
                            if let Some(file) = &f.file {
                                fm.uint(4, strings.id(file));
                            }
                            function_msgs.push(fm);
                            functions.insert(key, fid);
                            fid
                        }
                    };
                    let mut line = Msg::default();
                    line.uint(1, fid);
                    line.int(2, f.line.unwrap_or(0) as i64);
                    loc.msg(4, line);
                }
                location_msgs.push(loc);
                locations.insert(a_key(a), id);
                ids.push(id);
            }
            ids.extend(root);
            let mut sample = Msg::default();
            // Leaf first, as pprof wants (and as stack tables list them).
            sample.packed(1, ids);
            sample.packed(2, v.iter().copied());
            if piece.label.is_some() {
                let mut label = Msg::default();
                label.uint(1, pid_key);
                label.int(3, piece.pid as i64);
                sample.msg(3, label);
            }
            p.msg(2, sample);
        }
    }
    for (i, (lo, hi, off, path, build_id)) in mappings.iter().enumerate() {
        let mut m = Msg::default();
        m.uint(1, i as u64 + 1);
        m.uint(2, *lo);
        m.uint(3, *hi);
        m.uint(4, *off);
        m.uint(5, strings.id(path));
        m.uint(6, strings.id(build_id));
        m.bool(7, true);
        m.bool(8, true);
        m.bool(9, true);
        m.bool(10, true);
        p.msg(3, m);
    }
    for l in location_msgs {
        p.msg(4, l);
    }
    for f in function_msgs {
        p.msg(5, f);
    }
    let cap = pieces[0].cap;
    let header = cap.last_image();
    let period_type = value_type(&mut strings, "space", "bytes");
    let default_type = strings.id("inuse_space");
    let sampled = match pieces.iter().find_map(|p| p.cap.sample_rate()) {
        Some(rate) => format!(
            "; values are ESTIMATES from allocations sampled at one per {} bytes on average",
            rate
        ),
        None => String::new(),
    };
    let mut comment = match pieces.len() {
        1 => format!(
            "memtrack capture of {}{sampled}",
            crate::shell_command(&header.argv)
        ),
        n => format!(
            "memtrack capture of {} and {} more processes{sampled}",
            crate::shell_command(&header.argv),
            n - 1
        ),
    };
    if let Some(note) = note {
        comment.push_str(note);
    }
    let comment = strings.id(&comment);
    for s in &strings.list {
        p.bytes(6, s.as_bytes());
    }
    p.int(9, time.start_unix_ns as i64);
    p.int(10, time.duration_ns as i64);
    p.msg(11, period_type);
    p.int(12, 1);
    p.packed(13, [comment]);
    p.int(14, default_type as i64);
    p.0
}

/// `profile` gzip-compressed, as profile files are stored.
pub fn profile_gz(cap: &Capture, inuse: View, sym: &mut Symbolizer) -> std::io::Result<Vec<u8>> {
    gzip(&profile(cap, inuse, sym))
}

/// `profile_of` gzip-compressed.
pub fn profile_gz_of(
    pieces: Vec<Piece<'_>>,
    time: ProfileTime,
    note: Option<&str>,
) -> std::io::Result<Vec<u8>> {
    gzip(&profile_of(pieces, time, note))
}

fn gzip(raw: &[u8]) -> std::io::Result<Vec<u8>> {
    use std::io::Write;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(raw)?;
    gz.finish()
}

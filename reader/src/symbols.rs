//! Offline symbolization: return addresses to functions, files and lines, inlined frames
//! expanded, from the modules recorded in the capture (DWARF of the binary or of its separate
//! debug file, else the symbol table, else `module+0xoffset`). Each module is loaded once and
//! each address resolved once.

use crate::capture::Capture;
use crate::stacks::StackTable;
use memtrack_format::hash::FastMap;
use memtrack_format::{pyframe, Module};
use object::Object;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One frame of a symbolized stack.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub struct Frame {
    /// Demangled function name, or `module+0xoffset` when nothing better is known.
    pub function: String,
    pub file: Option<String>,
    pub line: Option<u32>,
}

impl Frame {
    /// `file:line`, shortened to the file name, when known.
    pub fn location(&self) -> Option<String> {
        let file = self.file.as_deref()?;
        let short = Path::new(file)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| file.to_string());
        Some(match self.line {
            Some(l) => format!("{short}:{l}"),
            None => short,
        })
    }
}

struct Loaded {
    module: Module,
    /// Runtime ranges of its executable segments.
    ranges: Vec<(u64, u64)>,
    name: String,
    loader: Option<addr2line::Loader>,
    tried: bool,
}

/// Resolves addresses of one capture.
pub struct Symbolizer {
    modules: Vec<Loaded>,
    cache: FastMap<u64, Arc<[Frame]>>,
    pycode: Arc<std::collections::HashMap<u32, memtrack_format::PyCodeRecord>>,
    /// Stacks keep only their Python frames (`--python-only`).
    pub python_only: bool,
    /// Things the user should know once (a binary that changed since the capture, say).
    pub warnings: Vec<String>,
}

impl Symbolizer {
    pub fn new(cap: &Capture) -> Self {
        let mut modules: Vec<Loaded> = Vec::new();
        // Newest snapshot first: after exec or dlclose/dlopen, the latest mapping of a range wins.
        for snap in cap.modules.iter().rev() {
            for m in &snap.modules {
                if modules
                    .iter()
                    .any(|l| l.module.path == m.path && l.module.base == m.base)
                {
                    continue;
                }
                let ranges = m
                    .segments
                    .iter()
                    .filter(|s| s.flags & 1 != 0)
                    .map(|s| {
                        (
                            m.base.wrapping_add(s.vaddr),
                            m.base.wrapping_add(s.vaddr + s.memsz),
                        )
                    })
                    .collect();
                let name = Path::new(&m.path)
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| m.path.clone());
                modules.push(Loaded {
                    module: m.clone(),
                    ranges,
                    name,
                    loader: None,
                    tried: false,
                });
            }
        }
        // MEMTRACK_SYMBOLIZE=0: no file is read, frames show as module+offset (fast, and the
        // same on every machine).
        if std::env::var_os("MEMTRACK_SYMBOLIZE").is_some_and(|v| v == "0") {
            for m in &mut modules {
                m.tried = true;
            }
        }
        Symbolizer {
            modules,
            cache: FastMap::default(),
            pycode: cap.pycode.clone(),
            python_only: false,
            warnings: Vec::new(),
        }
    }

    /// Frames for one return address, outermost inlined frame first... innermost last.
    pub fn frames(&mut self, addr: u64) -> Arc<[Frame]> {
        if let Some(f) = self.cache.get(&addr) {
            return f.clone();
        }
        let frames: Arc<[Frame]> = self.resolve(addr).into();
        self.cache.insert(addr, frames.clone());
        frames
    }

    fn resolve(&mut self, addr: u64) -> Vec<Frame> {
        if pyframe::is_python(addr) {
            let (id, lasti, _) = pyframe::decode(addr);
            return vec![match self.pycode.get(&id) {
                Some(c) => Frame {
                    function: c.qualname.clone(),
                    file: Some(c.filename.clone()),
                    line: c.line_of(lasti),
                },
                None => Frame {
                    function: format!("[python code {id}]"),
                    file: None,
                    line: None,
                },
            }];
        }
        let Some(i) = self
            .modules
            .iter()
            .position(|l| l.ranges.iter().any(|&(lo, hi)| addr >= lo && addr < hi))
        else {
            return vec![Frame {
                function: format!("{addr:#x}"),
                file: None,
                line: None,
            }];
        };
        self.load(i);
        let l = &self.modules[i];
        // A return address points after the call: look up the call itself.
        let probe = addr.wrapping_sub(1).wrapping_sub(l.module.base);
        let fallback = || {
            vec![Frame {
                function: format!("{}+{:#x}", l.name, probe + 1),
                file: None,
                line: None,
            }]
        };
        let Some(loader) = &l.loader else {
            return fallback();
        };
        let mut out = Vec::new();
        if let Ok(mut it) = loader.find_frames(probe) {
            while let Ok(Some(f)) = it.next() {
                let function = f
                    .function
                    .as_ref()
                    .and_then(|n| n.demangle().ok())
                    .map(|n| n.into_owned());
                let (file, line) = f
                    .location
                    .map(|loc| (loc.file.map(str::to_string), loc.line))
                    .unwrap_or((None, None));
                out.push(Frame {
                    function: function.unwrap_or_default(),
                    file,
                    line,
                });
            }
        }
        // addr2line yields the innermost frame first; callers want the outermost first.
        out.reverse();
        if out.iter().all(|f| f.function.is_empty()) {
            if let Some(sym) = loader.find_symbol(probe) {
                let name = addr2line::demangle_auto(sym.into(), None).into_owned();
                let (file, line) = out
                    .last()
                    .map(|f| (f.file.clone(), f.line))
                    .unwrap_or((None, None));
                return vec![Frame {
                    function: name,
                    file,
                    line,
                }];
            }
            return fallback();
        }
        for f in out.iter_mut().filter(|f| f.function.is_empty()) {
            f.function = format!("{}+{:#x}", l.name, probe + 1);
        }
        // rustc's DWARF names a function without its path (`keep_blocks` inside namespace
        // `app`); the symbol table's demangled name has it (`app::keep_blocks`).
        if let (Some(outer), Some(sym)) = (out.first_mut(), loader.find_symbol(probe)) {
            let base = outer.function.split('<').next().unwrap_or_default();
            if !base.is_empty() && !base.contains("::") {
                let full = addr2line::demangle_auto(sym.into(), None);
                if full.len() > base.len()
                    && full.ends_with(base)
                    && full[..full.len() - base.len()].ends_with("::")
                {
                    outer.function = full.into_owned();
                }
            }
        }
        out
    }

    fn load(&mut self, i: usize) {
        if self.modules[i].tried {
            return;
        }
        self.modules[i].tried = true;
        let m = self.modules[i].module.clone();
        let path = Path::new(&m.path);
        if !path.is_absolute() {
            return; // linux-vdso.so.1 and the like: no file
        }
        let Ok(data) = std::fs::read(path) else {
            self.warnings.push(format!(
                "{}: cannot read it; its frames show as offsets",
                m.path
            ));
            return;
        };
        let Ok(obj) = object::File::parse(&*data) else {
            return;
        };
        let file_id = obj
            .build_id()
            .ok()
            .flatten()
            .map(|b| b.to_vec())
            .unwrap_or_default();
        if !m.build_id.is_empty() && !file_id.is_empty() && file_id != m.build_id {
            self.warnings.push(format!(
                "{}: the file on disk is not the one that ran (build-id differs); its frames show as offsets",
                m.path
            ));
            return;
        }
        let debug = if obj.section_by_name(".debug_info").is_some() {
            path.to_path_buf()
        } else {
            separate_debug_file(path, &m.build_id, &obj).unwrap_or_else(|| path.to_path_buf())
        };
        self.modules[i].loader = addr2line::Loader::new(&debug).ok();
    }
}

/// A separate debug file: by build-id under /usr/lib/debug/.build-id, or by .gnu_debuglink
/// beside the binary, in its .debug directory, or under /usr/lib/debug.
fn separate_debug_file(path: &Path, build_id: &[u8], obj: &object::File<'_>) -> Option<PathBuf> {
    let hex: String = build_id.iter().map(|b| format!("{b:02x}")).collect();
    let mut candidates = Vec::new();
    if hex.len() > 2 {
        candidates.push(PathBuf::from(format!(
            "/usr/lib/debug/.build-id/{}/{}.debug",
            &hex[..2],
            &hex[2..]
        )));
    }
    if let Ok(Some((name, _crc))) = obj.gnu_debuglink() {
        let name = String::from_utf8_lossy(name).into_owned();
        if let Some(dir) = path.parent() {
            candidates.push(dir.join(&name));
            candidates.push(dir.join(".debug").join(&name));
            candidates.push(
                Path::new("/usr/lib/debug")
                    .join(dir.strip_prefix("/").unwrap_or(dir))
                    .join(&name),
            );
        }
    }
    candidates.into_iter().find(|c| c.is_file() && c != path)
}

/// A stack as symbolized frames, outermost first.
pub fn stack_frames(sym: &mut Symbolizer, stacks: &StackTable, stack: u32) -> Vec<Frame> {
    let mut out = Vec::new();
    for_each_frame(sym, stacks, stack, |f| out.push(f.clone()));
    out
}

/// Calls `f` on a stack's symbolized frames, outermost first (the frames of
/// [`stack_frames`], without copying them: reports that only read them build no vector).
pub fn for_each_frame(
    sym: &mut Symbolizer,
    stacks: &StackTable,
    stack: u32,
    mut f: impl FnMut(&Frame),
) {
    let addrs = stacks.frames(stack);
    let (n_py, runs) = python_runs(&addrs);
    if n_py == 0 {
        // Native frames, and Python frames (if any) already in place, each run just outside
        // its evaluation loop: the run stands for the loop, whose inlined callees stay.
        for (i, &addr) in addrs.iter().enumerate().rev() {
            let python = pyframe::is_python(addr);
            if sym.python_only && !python {
                continue;
            }
            let run_outside = addrs.get(i + 1).is_some_and(|&a| pyframe::is_python(a));
            sym.frames(addr)
                .iter()
                .filter(|fr| !(run_outside && !python && fr.function == EVAL_LOOP))
                .for_each(&mut f);
        }
        return;
    }
    let python = |sym: &mut Symbolizer, run: &[u64], f: &mut dyn FnMut(&Frame)| {
        for &a in run.iter().rev() {
            sym.frames(a).iter().for_each(&mut *f);
        }
    };
    if sym.python_only {
        for run in runs.iter().rev() {
            python(sym, run, &mut f);
        }
        return;
    }
    // Which native frames are evaluation loops, innermost first.
    let native = &addrs[n_py..];
    let mut per_addr: Vec<Arc<[Frame]>> = native.iter().map(|&a| sym.frames(a)).collect();
    per_addr.reverse(); // outermost first
    let evals = per_addr
        .iter()
        .flat_map(|fs| fs.iter())
        .filter(|fr| fr.function == EVAL_LOOP)
        .count();
    // The innermost loop ran the innermost run, and so on outwards. Runs beyond the loops seen
    // (the native stack was cut short at its root) go at the root end.
    for run in runs.iter().skip(evals).rev() {
        python(sym, run, &mut f);
    }
    let mut eval_seen = 0;
    for fs in &per_addr {
        for fr in fs.iter() {
            if fr.function == EVAL_LOOP {
                let k = evals - 1 - eval_seen;
                eval_seen += 1;
                if let Some(run) = runs.get(k) {
                    python(sym, run, &mut f);
                    continue;
                }
            }
            f(fr);
        }
    }
}

/// The Python frames of a stack's addresses (leaf first: they come before the native ones): how
/// many, and their runs, innermost run first. A run ends (outwards) at an entry frame: it is what
/// one `_PyEval_EvalFrameDefault` call on the native stack was running.
fn python_runs(addrs: &[u64]) -> (usize, Vec<Vec<u64>>) {
    let n_py = addrs.iter().take_while(|&&a| pyframe::is_python(a)).count();
    let mut runs: Vec<Vec<u64>> = vec![Vec::new()];
    for &a in &addrs[..n_py] {
        runs.last_mut().unwrap().push(a);
        if pyframe::decode(a).2 {
            runs.push(Vec::new());
        }
    }
    runs.retain(|r| !r.is_empty());
    (n_py, runs)
}

/// The addresses of a stack, leaf first, with each CPython evaluation loop's address replaced by
/// the Python frames it ran (as [`stack_frames`] does with frames): for exports that keep
/// addresses, such as pprof.
pub fn merged_addrs(sym: &mut Symbolizer, stacks: &StackTable, stack: u32) -> Vec<u64> {
    let addrs = stacks.frames(stack);
    let (n_py, runs) = python_runs(&addrs);
    if n_py == 0 {
        // Python frames in place already (or none): drop the loops that ran them.
        let is_loop_of_run = |i: usize, a: u64, sym: &mut Symbolizer| {
            addrs.get(i + 1).is_some_and(|&o| pyframe::is_python(o))
                && !pyframe::is_python(a)
                && sym.frames(a).iter().any(|f| f.function == EVAL_LOOP)
        };
        let mut out = Vec::with_capacity(addrs.len());
        for (i, &a) in addrs.iter().enumerate() {
            if !is_loop_of_run(i, a, sym) {
                out.push(a);
            }
        }
        return out;
    }
    let mut out = Vec::with_capacity(addrs.len());
    let mut k = 0;
    for &a in &addrs[n_py..] {
        if sym.frames(a).iter().any(|f| f.function == EVAL_LOOP) {
            if let Some(run) = runs.get(k) {
                out.extend_from_slice(run);
                k += 1;
                continue;
            }
        }
        out.push(a);
    }
    // Runs without an evaluation loop on the (cut) native stack: at the root end.
    for run in runs.iter().skip(k) {
        out.extend_from_slice(run);
    }
    out
}

/// CPython's evaluation loop: its native frames are replaced by the Python frames it ran.
const EVAL_LOOP: &str = "_PyEval_EvalFrameDefault";

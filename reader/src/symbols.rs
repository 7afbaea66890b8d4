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
    /// Demangled function name, or `module+0xoffset` when nothing better is known. For a
    /// Python frame, the code object's qualified name (`Handler.get`, `<module>`).
    pub function: String,
    /// For a Python frame, its file shortened as [`short_python_path`] does (the standard
    /// library and site-packages relative to their folder, the program's files relative to its
    /// directory), so that reports read the same from any checkout.
    pub file: Option<String>,
    pub line: Option<u32>,
    /// A Python frame (not a native one).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub python: bool,
}

impl Frame {
    /// A native frame named `function`, without a location.
    pub fn native(function: impl Into<String>) -> Frame {
        Frame {
            function: function.into(),
            file: None,
            line: None,
            python: false,
        }
    }

    /// `file:line` when known: a native file shortened to its name, a Python file as stored
    /// (already short, and its folders tell `<module>`s apart).
    pub fn location(&self) -> Option<String> {
        let file = self.file.as_deref()?;
        let short = if self.python {
            file.to_string()
        } else {
            Path::new(file)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| file.to_string())
        };
        Some(match self.line {
            Some(l) => format!("{short}:{l}"),
            None => short,
        })
    }

    /// The frame as reports name it: a native frame by its function; a Python frame as
    /// `qualname (file.py:LINE)`, since Python names alone (`<module>`, `run`, `__init__`) say
    /// little.
    pub fn label(&self) -> std::borrow::Cow<'_, str> {
        if !self.python {
            return std::borrow::Cow::Borrowed(&self.function);
        }
        match self.location() {
            Some(l) => std::borrow::Cow::Owned(format!("{} ({l})", self.function)),
            None => std::borrow::Cow::Borrowed(&self.function),
        }
    }
}

/// A Python source path as reports show it (the way Memray does): a file of the standard
/// library or of an installed package relative to its `lib/pythonX.Y`, `site-packages` or
/// `dist-packages` folder (`json/decoder.py`, `requests/api.py`); a file of the program relative
/// to the first of `program_dirs` that holds it (`svc.py`, `app/handlers.py`); anything else as
/// it is.
pub fn short_python_path(path: &str, program_dirs: &[String]) -> String {
    for marker in ["/site-packages/", "/dist-packages/"] {
        if let Some(i) = path.rfind(marker) {
            return path[i + marker.len()..].to_string();
        }
    }
    if let Some(i) = path.find("/lib/python3") {
        let rest = &path[i + "/lib/python3".len()..];
        // `.11/json/decoder.py`, `/json/...` (Debian's python3 folder), `t/` for 3.13t.
        if let Some(j) = rest.find('/') {
            let version = &rest[..j];
            if version.is_empty()
                || version
                    .trim_start_matches('.')
                    .trim_end_matches('t')
                    .bytes()
                    .all(|b| b.is_ascii_digit())
            {
                return rest[j + 1..].to_string();
            }
        }
    }
    for dir in program_dirs {
        if let Some(rest) = path.strip_prefix(dir.as_str()) {
            if let Some(rest) = rest.strip_prefix('/') {
                return rest.to_string();
            }
        }
    }
    path.to_string()
}

/// A file of the standard library or of an installed package (or frozen, or not a path).
fn is_library_path(path: &str) -> bool {
    !path.starts_with('/')
        || path.contains("/site-packages/")
        || path.contains("/dist-packages/")
        || path.contains("/lib/python3")
}

/// The deepest folder holding both folders `a` and `b`.
fn common_dir<'a>(a: &'a str, b: &str) -> &'a str {
    let (ab, bb) = (a.as_bytes(), b.as_bytes());
    let i = ab.iter().zip(bb).take_while(|(x, y)| x == y).count();
    if i == ab.len() && (i == bb.len() || bb[i] == b'/') {
        return a;
    }
    if i == bb.len() && ab[i] == b'/' {
        return &a[..i];
    }
    match ab[..i].iter().rposition(|&c| c == b'/') {
        Some(j) => &a[..j],
        None => "",
    }
}

/// The folders Python files are shown relative to: the main script's, then the deepest folder
/// holding every other program file (a console script's application imported from the working
/// directory: `gunicorn app:app` runs `/srv/app/app.py`, shown as `app.py`).
fn program_dirs(
    argv: &[String],
    codes: &std::collections::HashMap<u32, memtrack_format::PyCodeRecord>,
) -> Vec<String> {
    let main = program_dir(argv, codes);
    let mut dirs: Vec<String> = main.iter().cloned().collect();
    let mut common: Option<&str> = None;
    for c in codes.values() {
        let f = c.filename.as_str();
        if is_library_path(f)
            || main
                .as_deref()
                .is_some_and(|d| f.starts_with(&format!("{d}/")))
        {
            continue;
        }
        let dir = f.rsplit_once('/').map_or("", |(d, _)| d);
        common = Some(match common {
            None => dir,
            Some(c) => common_dir(c, dir),
        });
    }
    // Not the root itself, nor a top-level folder such as /usr or /home.
    if let Some(c) = common.filter(|c| c.matches('/').count() >= 2) {
        dirs.push(c.to_string());
    }
    dirs
}

/// The directory of a Python program's main script, from the command line and the code objects
/// met: `python3 [opts] path/svc.py` gives the folder of the `svc.py` whose code ran; `-m pkg`
/// the folder holding `pkg`.
fn program_dir(
    argv: &[String],
    codes: &std::collections::HashMap<u32, memtrack_format::PyCodeRecord>,
) -> Option<String> {
    let mut wanted: Vec<String> = Vec::new();
    let mut args = argv.iter().skip(1);
    while let Some(a) = args.next() {
        if a == "-m" {
            if let Some(m) = args.next() {
                let m = m.replace('.', "/");
                wanted.push(format!("/{m}/__main__.py"));
                wanted.push(format!("/{m}.py"));
            }
            break;
        }
        if a == "-c" {
            break;
        }
        // Options that take a value: skip it.
        if matches!(a.as_str(), "-X" | "-W" | "-Q") {
            args.next();
            continue;
        }
        // The script: `app.py`, or a console script without the suffix (`bin/gunicorn`).
        if !a.starts_with('-') {
            let name = Path::new(a).file_name()?.to_string_lossy().into_owned();
            wanted.push(format!("/{name}"));
            break;
        }
    }
    let mut best: Option<&str> = None;
    for c in codes.values() {
        if let Some(w) = wanted.iter().find(|w| c.filename.ends_with(w.as_str())) {
            if is_library_path(&c.filename) {
                continue;
            }
            let dir = &c.filename[..c.filename.len() - w.len()];
            // The shortest such folder: the program's root rather than a nested copy.
            if best.is_none_or(|b| dir.len() < b.len()) {
                best = Some(dir);
            }
        }
    }
    best.map(str::to_string)
}

struct Loaded {
    module: Module,
    /// Runtime ranges of its executable segments.
    ranges: Vec<(u64, u64)>,
    name: String,
    loader: Option<addr2line::Loader>,
    /// Its symbols with sizes, `.eh_frame` bounds and code (for names and wrappers).
    file: Option<crate::modinfo::ModuleFile>,
    tried: bool,
}

/// Resolves addresses of one capture.
pub struct Symbolizer {
    modules: Vec<Loaded>,
    cache: FastMap<u64, Arc<[Frame]>>,
    /// Module index of an address (`u32::MAX`: none).
    module_cache: FastMap<u64, u32>,
    pycode: Arc<std::collections::HashMap<u32, memtrack_format::PyCodeRecord>>,
    /// Stacks keep only their Python frames (`--python-only`).
    pub python_only: bool,
    /// Stacks keep the interpreter's own frames around Python frames (`--all-frames`).
    pub all_frames: bool,
    /// The folders of a Python program's files, for short paths.
    program_dirs: Vec<String>,
    /// Per module (same index as `modules`): it is the Python interpreter (holds its
    /// evaluation loop) or the C library, whose frames around Python frames are plumbing.
    plumbing: Vec<bool>,
    /// Things the user should know once (a binary that changed since the capture, say).
    pub warnings: Vec<String>,
    /// `--skip-function` patterns: functions that reports never name as the allocating one.
    pub skip_functions: Vec<String>,
    /// Wrapper verdicts by (return address, the skipped frame's return address or 0).
    wrappers: FastMap<(u64, u64), bool>,
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
                    file: None,
                    tried: false,
                });
            }
        }
        let program_dirs = if cap.pycode.is_empty() {
            Vec::new()
        } else {
            program_dirs(&cap.header.argv, &cap.pycode)
        };
        let plumbing = modules
            .iter()
            .map(|m| {
                let n = m.name.as_str();
                n.starts_with("libc.so")
                    || n.starts_with("libc-")
                    || n.starts_with("libpython3")
                    // The `python3.11` launcher of a shared build (`_start`, `main`).
                    || n == "python"
                    || n.starts_with("python3")
            })
            .collect();
        Symbolizer {
            modules,
            cache: FastMap::default(),
            module_cache: FastMap::default(),
            pycode: cap.pycode.clone(),
            python_only: false,
            all_frames: false,
            program_dirs,
            plumbing,
            warnings: Vec::new(),
            skip_functions: Vec::new(),
            wrappers: FastMap::default(),
        }
    }

    /// Takes the Python code objects of `cap` known now (a capture still being written gains
    /// them as the program runs): frames of code that was unknown are resolved again.
    pub fn update_python_code(&mut self, cap: &Capture) {
        if Arc::ptr_eq(&self.pycode, &cap.pycode) {
            return;
        }
        self.pycode = cap.pycode.clone();
        self.program_dirs = program_dirs(&cap.header.argv, &cap.pycode);
        self.cache.retain(|&a, _| !pyframe::is_python(a));
    }

    /// Reads no file from now on: frames show as module+offset (fast, and the same on every
    /// machine; the command's `MEMTRACK_SYMBOLIZE=0`).
    pub fn read_no_files(&mut self) {
        for m in &mut self.modules {
            m.tried = true;
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
                    file: Some(short_python_path(&c.filename, &self.program_dirs)),
                    line: c.line_of(lasti),
                    python: true,
                },
                None => Frame {
                    function: format!("[python code {id}]"),
                    file: None,
                    line: None,
                    python: true,
                },
            }];
        }
        let Some(i) = self.module_of(addr) else {
            return vec![Frame::native(format!("{addr:#x}"))];
        };
        self.load(i);
        let l = &self.modules[i];
        // A return address points after the call: look up the call itself.
        let probe = addr.wrapping_sub(1).wrapping_sub(l.module.base);
        // The symbol whose extent holds the address (not merely the nearest one before it: in
        // a stripped binary that is some other function), else the function `.eh_frame` knows
        // there, unnamed: `unknown@module+0xSTART`, by its start so that every call from one
        // function groups into one row, and the start is what objdump or a debug build takes.
        let function = l.file.as_ref().and_then(|f| f.function(probe));
        let symbol = function.as_ref().and_then(|f| f.name);
        let mut out = Vec::new();
        if let Some(Ok(mut it)) = l.loader.as_ref().map(|d| d.find_frames(probe)) {
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
                    python: false,
                });
            }
        }
        // addr2line yields the innermost frame first; callers want the outermost first.
        out.reverse();
        if out.iter().all(|f| f.function.is_empty()) {
            let name = match &function {
                Some(f) => match f.name {
                    Some(sym) => addr2line::demangle_auto(sym.into(), None).into_owned(),
                    None => format!("unknown@{}+{:#x}", l.name, f.start),
                },
                None => format!("{}+{:#x}", l.name, probe + 1),
            };
            let (file, line) = out
                .last()
                .map(|f| (f.file.clone(), f.line))
                .unwrap_or((None, None));
            return vec![Frame {
                function: name,
                file,
                line,
                python: false,
            }];
        }
        for f in out.iter_mut().filter(|f| f.function.is_empty()) {
            f.function = format!("{}+{:#x}", l.name, probe + 1);
        }
        // rustc's DWARF names a function without its path (`keep_blocks` inside namespace
        // `app`); the symbol table's demangled name has it (`app::keep_blocks`).
        if let (Some(outer), Some(sym)) = (out.first_mut(), symbol) {
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

    /// The module an address is in (index into `modules`).
    fn module_of(&mut self, addr: u64) -> Option<usize> {
        if let Some(&m) = self.module_cache.get(&addr) {
            return (m != u32::MAX).then_some(m as usize);
        }
        let m = self
            .modules
            .iter()
            .position(|l| l.ranges.iter().any(|&(lo, hi)| addr >= lo && addr < hi));
        self.module_cache
            .insert(addr, m.map_or(u32::MAX, |m| m as u32));
        m
    }

    /// Marks the module of an evaluation loop's address as the interpreter (it may be the
    /// `python3` executable itself rather than a libpython).
    fn note_interpreter(&mut self, addr: u64) {
        if let Some(m) = self.module_of(addr) {
            self.plumbing[m] = true;
        }
    }

    /// The address is in the interpreter or the C library.
    fn is_plumbing(&mut self, addr: u64) -> bool {
        self.module_of(addr).is_some_and(|m| self.plumbing[m])
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
        let Some(data) = std::fs::File::open(path)
            .ok()
            // SAFETY: a read-only private mapping; the module file is not written while read.
            .and_then(|f| unsafe { memmap2::Mmap::map(&f) }.ok())
        else {
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
        self.modules[i].file = crate::modinfo::ModuleFile::open(path, Some(&debug));
    }

    /// Whether the function of return address `addr` only passes an allocation on to the
    /// allocator (see [`crate::modinfo::ModuleFile::is_wrapper`]): `inner` is the return
    /// address of the frame below it, already skipped (None: `addr` called the allocator).
    pub(crate) fn is_wrapper_at(&mut self, addr: u64, inner: Option<u64>) -> bool {
        let key = (addr, inner.unwrap_or(0));
        if let Some(&w) = self.wrappers.get(&key) {
            return w;
        }
        let w = self.wrapper_code(addr, inner);
        self.wrappers.insert(key, w);
        w
    }

    fn wrapper_code(&mut self, addr: u64, inner: Option<u64>) -> bool {
        if pyframe::is_python(addr) {
            return false;
        }
        let Some(i) = self.module_of(addr) else {
            return false;
        };
        self.load(i);
        let mut what = crate::modinfo::Inner::default();
        if let Some(a) = inner {
            what.names = self.frames(a).iter().map(|f| f.function.clone()).collect();
            if self.module_of(a) == Some(i) {
                let base = self.modules[i].module.base;
                let probe = a.wrapping_sub(1).wrapping_sub(base);
                if let Some(f) = self.modules[i]
                    .file
                    .as_ref()
                    .and_then(|f| f.function(probe))
                {
                    what.starts.push(f.start);
                    what.names.extend(f.name.map(str::to_string));
                }
            }
        }
        let l = &self.modules[i];
        let probe = addr.wrapping_sub(1).wrapping_sub(l.module.base);
        l.file.as_ref().is_some_and(|f| f.is_wrapper(probe, &what))
    }

    /// Whether `--skip-function` names the function.
    pub(crate) fn skips(&self, function: &str) -> bool {
        self.skip_functions.iter().any(|p| glob(p, function))
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

impl Symbolizer {
    /// A stack as symbolized frames, outermost first.
    pub fn stack_frames(&mut self, stacks: &StackTable, stack: u32) -> Vec<Frame> {
        let mut out = Vec::new();
        self.for_each_frame(stacks, stack, |f| out.push(f.clone()));
        out
    }

    /// Calls `f` on a stack's symbolized frames, outermost first (the frames of
    /// [`Symbolizer::stack_frames`], without copying them: reports that only read them build no vector).
    ///
    /// In a stack that ran Python code, each CPython evaluation loop is replaced by the Python frames
    /// it ran, and (unless `all_frames`) the interpreter's and the C library's native frames on the
    /// root side of the innermost Python frame are left out: they are the interpreter's plumbing
    /// (`_PyObject_VectorcallTstate`, `pyrun_file`, `__libc_start_main`). Extension modules' frames,
    /// and every frame from the innermost Python frame to the allocator, stay.
    pub fn for_each_frame(&mut self, stacks: &StackTable, stack: u32, mut f: impl FnMut(&Frame)) {
        let addrs = stacks.frames(stack);
        if !addrs.iter().any(|&a| pyframe::is_python(a)) {
            for &addr in addrs.iter().rev() {
                self.frames(addr).iter().for_each(&mut f);
            }
            return;
        }
        // (frames of one address, the address), outermost first.
        let mut seq: Vec<(Arc<[Frame]>, u64)> = Vec::with_capacity(addrs.len());
        let (n_py, runs) = python_runs(&addrs);
        if n_py == 0 {
            // Python frames already in place, each run just outside its evaluation loop: the run
            // stands for the loop, whose inlined callees stay.
            for (i, &addr) in addrs.iter().enumerate().rev() {
                if pyframe::is_python(addr) {
                    seq.push((self.frames(addr), addr));
                    continue;
                }
                let frames = self.frames(addr);
                let run_outside = addrs.get(i + 1).is_some_and(|&a| pyframe::is_python(a));
                let is_loop = frames.iter().any(|fr| fr.function == EVAL_LOOP);
                if is_loop {
                    self.note_interpreter(addr);
                }
                let frames: Arc<[Frame]> = if run_outside && is_loop {
                    frames
                        .iter()
                        .filter(|fr| fr.function != EVAL_LOOP)
                        .cloned()
                        .collect()
                } else {
                    frames
                };
                seq.push((frames, addr));
            }
        } else {
            // Which native frames are evaluation loops, innermost first.
            let native = &addrs[n_py..];
            let mut per_addr: Vec<(u64, Arc<[Frame]>)> =
                native.iter().map(|&a| (a, self.frames(a))).collect();
            per_addr.reverse(); // outermost first
            let mut evals = 0;
            for (a, fs) in &per_addr {
                let n = fs.iter().filter(|fr| fr.function == EVAL_LOOP).count();
                if n > 0 {
                    self.note_interpreter(*a);
                }
                evals += n;
            }
            let push_run =
                |sym: &mut Symbolizer, run: &[u64], seq: &mut Vec<(Arc<[Frame]>, u64)>| {
                    for &a in run.iter().rev() {
                        seq.push((sym.frames(a), a));
                    }
                };
            // The innermost loop ran the innermost run, and so on outwards. Runs beyond the loops
            // seen (the native stack was cut short at its root) go at the root end.
            for run in runs.iter().skip(evals).rev() {
                push_run(self, run, &mut seq);
            }
            let mut eval_seen = 0;
            for (addr, fs) in &per_addr {
                // Frames of one address up to (outside) its loop, the run, then the rest.
                let mut pending: Vec<Frame> = Vec::new();
                for fr in fs.iter() {
                    if fr.function == EVAL_LOOP {
                        let k = evals - 1 - eval_seen;
                        eval_seen += 1;
                        if let Some(run) = runs.get(k) {
                            if !pending.is_empty() {
                                seq.push((std::mem::take(&mut pending).into(), *addr));
                            }
                            push_run(self, run, &mut seq);
                            continue;
                        }
                    }
                    pending.push(fr.clone());
                }
                if !pending.is_empty() {
                    seq.push((pending.into(), *addr));
                }
            }
        }
        if self.python_only {
            for (frames, _) in &seq {
                frames.iter().filter(|fr| fr.python).for_each(&mut f);
            }
            return;
        }
        // The innermost Python frame: plumbing is looked for on its root side only.
        let innermost = seq
            .iter()
            .rposition(|(frames, _)| frames.iter().any(|fr| fr.python))
            .unwrap_or(0);
        for (i, (frames, addr)) in seq.iter().enumerate() {
            let hide = i < innermost
                && !self.all_frames
                && !frames.iter().any(|fr| fr.python)
                && self.is_plumbing(*addr);
            if !hide {
                frames.iter().for_each(&mut f);
            }
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

impl Symbolizer {
    /// The addresses of a stack, leaf first, with each CPython evaluation loop's address replaced by
    /// the Python frames it ran (as [`Symbolizer::stack_frames`] does with frames): for exports that keep
    /// addresses, such as pprof.
    pub fn merged_addrs(&mut self, stacks: &StackTable, stack: u32) -> Vec<u64> {
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
                if !is_loop_of_run(i, a, self) {
                    out.push(a);
                }
            }
            return out;
        }
        let mut out = Vec::with_capacity(addrs.len());
        let mut k = 0;
        for &a in &addrs[n_py..] {
            if self.frames(a).iter().any(|f| f.function == EVAL_LOOP) {
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
}

/// CPython's evaluation loop: its native frames are replaced by the Python frames it ran.
const EVAL_LOOP: &str = "_PyEval_EvalFrameDefault";

/// Glob match of a whole name: `*` any run of characters, `?` one character.
fn glob(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    // Iterative matcher with backtracking to the last `*`.
    let (mut pi, mut ni, mut star, mut mark) = (0, 0, None, 0);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    #[test]
    fn globs_match_whole_names() {
        use super::glob;
        assert!(glob("xmalloc", "xmalloc"));
        assert!(!glob("xmalloc", "xmalloc_array"));
        assert!(glob("x*alloc", "xrealloc"));
        assert!(glob("g_*", "g_malloc0"));
        assert!(glob("*::alloc*", "pool::alloc_block"));
        assert!(glob("a?c", "abc"));
        assert!(!glob("a?c", "abbc"));
        assert!(!glob("*alloc", "alloc_it"));
    }

    #[test]
    fn python_paths_are_shortened_as_memray_shows_them() {
        use super::{common_dir, program_dirs, short_python_path};
        let dirs = vec!["/home/u/a".to_string()];
        for (path, short) in [
            ("/usr/lib/python3.11/json/decoder.py", "json/decoder.py"),
            (
                "/root/.pyenv/versions/3.13.0/lib/python3.13/asyncio/events.py",
                "asyncio/events.py",
            ),
            (
                "/usr/lib/python3/dist-packages/requests/api.py",
                "requests/api.py",
            ),
            (
                "/v/.venv/lib/python3.12/site-packages/flask/app.py",
                "flask/app.py",
            ),
            ("/home/u/a/svc.py", "svc.py"),
            ("/home/u/a/pkg/mod.py", "pkg/mod.py"),
            ("/home/u/ab/x.py", "/home/u/ab/x.py"),
            (
                "<frozen importlib._bootstrap>",
                "<frozen importlib._bootstrap>",
            ),
        ] {
            assert_eq!(short_python_path(path, &dirs), short, "{path}");
        }
        assert_eq!(common_dir("/a/b/c", "/a/b/d"), "/a/b");
        assert_eq!(common_dir("/a/b", "/a/b/d"), "/a/b");
        assert_eq!(common_dir("/a/b/d", "/a/b"), "/a/b");
        assert_eq!(common_dir("/a/bc", "/a/bd"), "/a");
        // A console script in bin/, the application in the working directory.
        let code = |id: u32, filename: &str| {
            (
                id,
                memtrack_format::PyCodeRecord {
                    id,
                    qualname: "<module>".into(),
                    filename: filename.into(),
                    ..Default::default()
                },
            )
        };
        let codes = [
            code(1, "/venv/bin/gunicorn"),
            code(2, "/srv/app/app.py"),
            code(3, "/srv/app/views/home.py"),
            code(4, "/venv/lib/python3.11/site-packages/gunicorn/arbiter.py"),
        ]
        .into_iter()
        .collect();
        let argv: Vec<String> = ["python3", "/venv/bin/gunicorn", "app:app"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(program_dirs(&argv, &codes), ["/venv/bin", "/srv/app"]);
    }
}

//! The pyo3 binding `nanochat._rustbpe` (cargo feature "python"). It only converts types, releases the GIL around
//! the work, and turns every error into a Python exception: `Error::Value` -> ValueError, `Error::Io` -> OSError,
//! anything else and any Rust panic (caught here with catch_unwind) -> RuntimeError. See _rustbpe.pyi.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::OnceLock;

use pyo3::exceptions::{PyOSError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyString};
use pyo3::wrap_pyfunction;

use crate::pools::PoolCache;
use crate::{check_vocab_size, serialize, Allowed, Error, Trainer};

/// Text per training batch; small enough that pulling the next batch from Python overlaps counting this one.
const BATCH_BYTES: usize = 4 << 20;
/// Thread pools kept for `encode_batch(num_threads=k)` with distinct k (least recently used evicted).
const MAX_POOLS: usize = 4;

fn py_err(e: Error) -> PyErr {
    match e {
        Error::Value(m) => PyValueError::new_err(m),
        Error::Io(m) => PyOSError::new_err(m),
        Error::Runtime(m) => PyRuntimeError::new_err(m),
    }
}

/// Runs `f`, turning a Rust panic into RuntimeError instead of letting it cross into Python.
fn guard<T>(f: impl FnOnce() -> PyResult<T>) -> PyResult<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            Err(PyRuntimeError::new_err(format!("internal error in nanochat._rustbpe: {msg}")))
        }
    }
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "?".into())
}

/// UTF-8 view of a Python str; a lone surrogate (not encodable as UTF-8) is a ValueError naming `what`.
fn utf8<'a>(s: &'a Bound<'_, PyString>, what: &dyn Fn() -> String) -> PyResult<&'a str> {
    s.to_str().map_err(|e| {
        PyValueError::new_err(format!("{} is not valid Unicode text (lone surrogate?): {e}", what()))
    })
}

fn as_str<'a, 'py>(obj: &'a Bound<'py, PyAny>, what: &dyn Fn() -> String) -> PyResult<&'a Bound<'py, PyString>> {
    obj.downcast::<PyString>()
        .map_err(|_| PyTypeError::new_err(format!("{} must be str, got {}", what(), type_name(obj))))
}

fn ids_u32(ids: Vec<i64>) -> PyResult<Vec<u32>> {
    ids.into_iter()
        .map(|i| u32::try_from(i).map_err(|_| PyValueError::new_err(format!("token id {i} is out of range"))))
        .collect()
}

/// Runs `f` on a pool of `num_threads` threads (0 = the global pool, all cores). Pools come from a bounded cache
/// (crate::pools): a caller cycling through thread counts cannot pile up threads.
fn with_pool<T: Send>(num_threads: usize, f: impl FnOnce() -> T + Send) -> Result<T, Error> {
    if num_threads == 0 {
        return Ok(f());
    }
    static POOLS: OnceLock<PoolCache> = OnceLock::new();
    let pool = POOLS.get_or_init(|| PoolCache::for_this_machine(MAX_POOLS)).get(num_threads)?;
    Ok(pool.install(f))
}

// ---------------------------------------------------------------------------------------------------------------

#[pyclass(name = "Tokenizer", module = "nanochat._rustbpe", frozen)]
pub struct PyTokenizer {
    inner: crate::Tokenizer,
}

#[pymethods]
impl PyTokenizer {
    #[staticmethod]
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (texts, vocab_size, pattern="nanochat", special_tokens=Vec::new(), max_chars=None,
                        doc_cap=None, buffer_size=8192, progress=false))]
    fn train_from_iterator(
        py: Python<'_>,
        texts: &Bound<'_, PyAny>,
        vocab_size: i64,
        pattern: &str,
        special_tokens: Vec<String>,
        max_chars: Option<i64>,
        doc_cap: Option<i64>,
        buffer_size: i64,
        progress: bool,
    ) -> PyResult<Self> {
        guard(|| {
            check_vocab_size(vocab_size.max(0) as usize, special_tokens.len()).map_err(py_err)?;
            if let Some(m) = max_chars.filter(|&m| m < 0) {
                return Err(PyValueError::new_err(format!("max_chars must be >= 0, got {m}")));
            }
            if let Some(c) = doc_cap.filter(|&c| c < 1) {
                return Err(PyValueError::new_err(format!("doc_cap must be >= 1, got {c}")));
            }
            if buffer_size < 1 {
                return Err(PyValueError::new_err(format!("buffer_size must be >= 1, got {buffer_size}")));
            }
            let mut trainer = Trainer::new(pattern).map_err(py_err)?;
            let mut iter = texts.try_iter().map_err(|_| {
                PyTypeError::new_err(format!("texts must be an iterable of str, got {}", type_name(texts)))
            })?;
            let started = std::time::Instant::now();
            let mut last_report = started;
            let (mut index, mut chars) = (0usize, 0i64);
            // One batch: up to buffer_size documents or BATCH_BYTES of text, copied out of Python under the GIL.
            let mut pull = || -> PyResult<(Vec<String>, bool)> {
                let mut batch: Vec<String> = Vec::with_capacity(buffer_size.min(1 << 16) as usize);
                let mut bytes = 0usize;
                while batch.len() < buffer_size as usize && bytes < BATCH_BYTES {
                    if max_chars.is_some_and(|m| chars >= m) {
                        return Ok((batch, true));
                    }
                    let Some(item) = iter.next() else { return Ok((batch, true)) };
                    let item = item?;
                    let what = || format!("texts[{index}]");
                    let s = as_str(&item, &what)?;
                    let mut text = utf8(s, &what)?;
                    let mut n = s.len()? as i64;
                    if let Some(cap) = doc_cap.filter(|&c| n > c) {
                        let end = text.char_indices().nth(cap as usize).map_or(text.len(), |(i, _)| i);
                        text = &text[..end];
                        n = cap;
                    }
                    chars += n;
                    bytes += text.len();
                    batch.push(text.to_owned());
                    index += 1;
                }
                Ok((batch, false))
            };
            // Pipeline: while one batch is counted on the rayon threads (no GIL needed), the next is pulled.
            let (mut batch, mut done) = pull()?;
            loop {
                let (counted, next) = std::thread::scope(|scope| {
                    let worker = scope.spawn(|| trainer.add_batch(&batch));
                    let next = if done { Ok((Vec::new(), true)) } else { pull() };
                    let counted = py.allow_threads(|| worker.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
                    (counted, next)
                });
                counted.map_err(py_err)?;
                if done {
                    break;
                }
                (batch, done) = next?;
                if progress && last_report.elapsed().as_secs_f64() > 5.0 {
                    last_report = std::time::Instant::now();
                    let (docs, bytes, unique) = trainer.stats();
                    eprintln!(
                        "rustbpe: read {docs} documents, {:.1} MB, ~{unique} unique pieces ({:.1}s)",
                        bytes as f64 / 1e6,
                        started.elapsed().as_secs_f64()
                    );
                }
            }
            if progress {
                let (docs, bytes, unique) = trainer.stats();
                eprintln!(
                    "rustbpe: counted {docs} documents, {:.1} MB, ~{unique} unique pieces in {:.2}s",
                    bytes as f64 / 1e6,
                    started.elapsed().as_secs_f64()
                );
            }
            let tok = py
                .allow_threads(|| trainer.finish(vocab_size as usize, special_tokens, progress))
                .map_err(py_err)?;
            if progress {
                eprintln!("rustbpe: trained {} tokens in {:.1}s", tok.vocab_size(), started.elapsed().as_secs_f64());
            }
            Ok(PyTokenizer { inner: tok })
        })
    }

    #[staticmethod]
    #[pyo3(signature = (mergeable_ranks, pattern="nanochat", special_tokens=Vec::new()))]
    fn from_ranks(mergeable_ranks: &Bound<'_, PyAny>, pattern: &str, special_tokens: Vec<String>) -> PyResult<Self> {
        guard(|| {
            let mut ranks = Vec::new();
            for (i, item) in mergeable_ranks.try_iter()?.enumerate() {
                let item = item?;
                let b = item.downcast::<PyBytes>().map_err(|_| {
                    PyTypeError::new_err(format!("mergeable_ranks[{i}] must be bytes, got {}", type_name(&item)))
                })?;
                ranks.push(b.as_bytes().to_vec());
            }
            let inner = crate::Tokenizer::from_ranks(ranks, pattern, special_tokens).map_err(py_err)?;
            Ok(PyTokenizer { inner })
        })
    }

    #[staticmethod]
    fn load(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        guard(|| Ok(PyTokenizer { inner: py.allow_threads(|| serialize::load(&path)).map_err(py_err)? }))
    }

    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        guard(|| py.allow_threads(|| serialize::save(&self.inner, &path)).map_err(py_err))
    }

    #[staticmethod]
    fn _from_bytes(data: &[u8]) -> PyResult<Self> {
        guard(|| {
            let inner = serialize::from_bytes(data).map_err(|e| PyValueError::new_err(format!("bad tokenizer bytes: {e}")))?;
            Ok(PyTokenizer { inner })
        })
    }

    /// Pickling: (Tokenizer._from_bytes, (saved bytes,)).
    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<(Bound<'py, PyAny>, (Bound<'py, PyBytes>,))> {
        guard(|| {
            let data = serialize::to_bytes(&slf.get().inner);
            Ok((slf.get_type().getattr("_from_bytes")?, (PyBytes::new(slf.py(), &data),)))
        })
    }

    fn __repr__(&self) -> String {
        format!("<nanochat._rustbpe.Tokenizer vocab_size={} specials={}>", self.inner.vocab_size(), self.inner.specials().len())
    }

    #[getter]
    fn pattern(&self) -> &str {
        self.inner.pattern()
    }

    #[getter]
    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }

    fn special_tokens<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for s in self.inner.specials() {
            d.set_item(s, self.inner.special_id(s).unwrap())?;
        }
        Ok(d)
    }

    fn mergeable_ranks<'py>(&self, py: Python<'py>) -> Vec<Bound<'py, PyBytes>> {
        self.inner.ranks().iter().map(|t| PyBytes::new(py, t)).collect()
    }

    fn merges(&self) -> Vec<(u32, u32)> {
        self.inner.merges().to_vec()
    }

    fn encode_ordinary(&self, py: Python<'_>, text: &Bound<'_, PyString>) -> PyResult<Vec<u32>> {
        guard(|| {
            let text = utf8(text, &|| "text".into())?;
            if text.len() < 4096 {
                self.inner.encode_ordinary(text).map_err(py_err)
            } else {
                py.allow_threads(|| self.inner.encode_ordinary(text)).map_err(py_err)
            }
        })
    }

    #[pyo3(signature = (text, allowed_special=None))]
    fn encode(&self, py: Python<'_>, text: &Bound<'_, PyString>, allowed_special: Option<&Bound<'_, PyAny>>) -> PyResult<Vec<u32>> {
        guard(|| {
            let text = utf8(text, &|| "text".into())?;
            let mut list: Vec<String> = Vec::new();
            let mut all = false;
            if let Some(a) = allowed_special {
                if let Ok(s) = a.downcast::<PyString>() {
                    if s.to_str()? != "all" {
                        return Err(PyValueError::new_err(format!(
                            "allowed_special must be \"all\" or a set of special-token strings, got the str {s}"
                        )));
                    }
                    all = true;
                } else {
                    for (i, item) in a.try_iter()?.enumerate() {
                        let item = item?;
                        let what = || format!("allowed_special item {i}");
                        list.push(utf8(as_str(&item, &what)?, &what)?.to_string());
                    }
                }
            }
            let allowed = if all { Allowed::All } else if list.is_empty() { Allowed::None } else { Allowed::Some(&list) };
            py.allow_threads(|| self.inner.encode_with_special(text, allowed)).map_err(py_err)
        })
    }

    #[pyo3(signature = (texts, num_threads=0))]
    fn encode_batch(&self, py: Python<'_>, texts: &Bound<'_, PyAny>, num_threads: i64) -> PyResult<Vec<Vec<u32>>> {
        guard(|| {
            if num_threads < 0 {
                return Err(PyValueError::new_err(format!("num_threads must be >= 0, got {num_threads}")));
            }
            let items: Vec<Bound<'_, PyAny>> = texts.try_iter()?.collect::<PyResult<_>>()?;
            let mut strs: Vec<&str> = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let what = || format!("texts[{i}]");
                strs.push(utf8(as_str(item, &what)?, &what)?);
            }
            py.allow_threads(|| with_pool(num_threads as usize, || self.inner.encode_batch(&strs)))
                .map_err(py_err)?
                .map_err(py_err)
        })
    }

    fn decode_bytes<'py>(&self, py: Python<'py>, ids: Vec<i64>) -> PyResult<Bound<'py, PyBytes>> {
        guard(|| {
            let ids = ids_u32(ids)?;
            let bytes = self.inner.decode_bytes(&ids).map_err(py_err)?;
            Ok(PyBytes::new(py, &bytes))
        })
    }

    #[pyo3(signature = (ids, errors="replace"))]
    fn decode<'py>(&self, py: Python<'py>, ids: Vec<i64>, errors: &str) -> PyResult<Bound<'py, PyAny>> {
        let bytes = self.decode_bytes(py, ids)?;
        bytes.call_method1("decode", ("utf-8", errors))
    }

    fn id_to_bytes<'py>(&self, py: Python<'py>, id: i64) -> PyResult<Bound<'py, PyBytes>> {
        guard(|| {
            let id = u32::try_from(id).map_err(|_| PyValueError::new_err(format!("token id {id} is out of range")))?;
            Ok(PyBytes::new(py, self.inner.id_to_bytes(id).map_err(py_err)?))
        })
    }

    fn token_bytes(&self) -> Vec<u32> {
        self.inner.token_bytes()
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The CPU int8 matmul (crate int8mm). Tensors cross as addresses: nanochat.model.int8_cpu checks dtype, device,
// contiguity and shapes of the torch tensors and allocates y; here the addresses are checked for null and alignment
// and the lengths again by int8mm::Product::new, so a wrong shape is a ValueError, not a read past the end.

/// y (m, n) = x (m, k) @ (scale[:, None] * q (n, k)).T; x, scale, y float32, q int8 in int8mm's packed layout
/// (int8mm::pack; packed_len(n, k) bytes), all C-contiguous on the CPU.
#[pyfunction]
#[pyo3(signature = (x_ptr, q_ptr, scale_ptr, y_ptr, m, n, k, isa, num_threads=0))]
#[allow(clippy::too_many_arguments)]
fn int8_matmul(
    py: Python<'_>, x_ptr: usize, q_ptr: usize, scale_ptr: usize, y_ptr: usize, m: usize, n: usize, k: usize,
    isa: &str, num_threads: usize,
) -> PyResult<()> {
    let isa = int8mm::Isa::from_name(isa)
        .ok_or_else(|| PyValueError::new_err(format!("unknown instruction set {isa:?} (avx512, avx2, scalar)")))?;
    let shape = int8mm::Shape { m, n, k };
    let (nx, nq, ny) = match (m.checked_mul(k), int8mm::packed_len(n, k), m.checked_mul(n)) {
        (Some(nx), Some(nq), Some(ny)) => (nx, nq, ny),
        _ => return Err(PyValueError::new_err(format!("shape ({m}, {n}, {k}) overflows"))),
    };
    for (name, addr, count, align) in
        [("x", x_ptr, nx, 4), ("q", q_ptr, nq, 1), ("scale", scale_ptr, n, 4), ("y", y_ptr, ny, 4)]
    {
        if count > 0 && (addr == 0 || addr % align != 0) {
            return Err(PyValueError::new_err(format!("{name}: address {addr:#x} is null or misaligned")));
        }
    }
    // SAFETY: the caller (nanochat.model.int8_cpu) passes the data pointers of live contiguous CPU tensors of
    // exactly these lengths and holds them for the duration of the call; y is not aliased by x, q or scale.
    let (x, q, scale, y) = unsafe {
        (
            slice_or_empty(x_ptr as *const f32, nx),
            slice_or_empty(q_ptr as *const i8, nq),
            slice_or_empty(scale_ptr as *const f32, n),
            if ny == 0 { &mut [][..] } else { std::slice::from_raw_parts_mut(y_ptr as *mut f32, ny) },
        )
    };
    py.allow_threads(|| {
        guard(|| {
            let threads = if num_threads == 0 { rayon::current_num_threads() } else { num_threads };
            let product = int8mm::Product::new(x, q, scale, y, shape, isa, threads).map_err(PyValueError::new_err)?;
            if threads == 1 || !product.worth_splitting() {
                // on the calling thread: no thread to wake, none to compete with torch's own
                product.work();
            } else if let Some(parallel) = openmp::parallel() {
                openmp::run(parallel, &product, threads)?;
            } else {
                with_pool(num_threads, || product.run_on_rayon()).map_err(py_err)?;
            }
            Ok(())
        })
    })
}

/// Use the OpenMP runtime already loaded into this process (torch's) for int8_matmul's threads: its team is the
/// one torch's own parallel ops run on, awake between ops, so the kernel neither wakes sleeping threads nor
/// competes with torch's spinning ones for the cores. `path` names the loaded library (nanochat.model.int8_cpu
/// finds it in /proc/self/maps); it is opened only if already loaded (RTLD_NOLOAD). Returns whether it is in use.
/// None detaches it (rayon's pool from then on).
#[pyfunction]
fn int8_use_openmp(path: Option<PathBuf>) -> PyResult<bool> {
    guard(|| {
        Ok(match path {
            Some(p) => openmp::attach(&p),
            None => {
                openmp::detach();
                false
            }
        })
    })
}

#[cfg(not(unix))]
mod openmp {
    pub type Parallel = ();
    pub fn attach(_: &std::path::Path) -> bool {
        false
    }
    pub fn detach() {}
    pub fn parallel() -> Option<Parallel> {
        None
    }
    pub fn run(_: Parallel, _: &int8mm::Product, _: usize) -> pyo3::PyResult<()> {
        unreachable!("no OpenMP runtime is attached off unix")
    }
}

#[cfg(unix)]
mod openmp {
    use std::ffi::{c_uint, c_void, CString};
    use std::os::unix::ffi::OsStrExt;
    use std::panic::{catch_unwind, AssertUnwindSafe};
    use std::path::Path;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use pyo3::exceptions::PyRuntimeError;
    use pyo3::PyResult;

    /// libgomp's `GOMP_parallel(fn, data, num_threads, flags)`: runs fn(data) on a team of num_threads threads,
    /// the caller included, and returns when all have (the ABI GCC emits for `#pragma omp parallel`; LLVM's and
    /// Intel's runtimes export it too).
    pub type Parallel = unsafe extern "C" fn(extern "C" fn(*mut c_void), *mut c_void, c_uint, c_uint);

    static PARALLEL: AtomicUsize = AtomicUsize::new(0);

    pub fn attach(path: &Path) -> bool {
        let Ok(cpath) = CString::new(path.as_os_str().as_bytes()) else { return false };
        // SAFETY: dlopen/dlsym with a valid C string; RTLD_NOLOAD never loads a library, only returns one that is
        // already mapped; the handle is kept open for the life of the process.
        unsafe {
            let handle = libc::dlopen(cpath.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD);
            if handle.is_null() {
                return false;
            }
            let sym = libc::dlsym(handle, c"GOMP_parallel".as_ptr());
            if sym.is_null() {
                return false;
            }
            PARALLEL.store(sym as usize, Ordering::Release);
        }
        true
    }

    pub fn detach() {
        PARALLEL.store(0, Ordering::Release);
    }

    pub fn parallel() -> Option<Parallel> {
        match PARALLEL.load(Ordering::Acquire) {
            0 => None,
            // SAFETY: a non-zero value was stored by `attach` from dlsym("GOMP_parallel") of a loaded runtime
            addr => Some(unsafe { std::mem::transmute::<usize, Parallel>(addr) }),
        }
    }

    struct Job<'p, 'a> {
        product: &'p int8mm::Product<'a>,
        panicked: AtomicBool,
    }

    extern "C" fn body(data: *mut c_void) {
        // SAFETY: `run` passes a pointer to a Job that outlives the GOMP_parallel call
        let job = unsafe { &*(data as *const Job) };
        if catch_unwind(AssertUnwindSafe(|| job.product.work())).is_err() {
            job.panicked.store(true, Ordering::Relaxed);
        }
    }

    pub fn run(parallel: Parallel, product: &int8mm::Product, threads: usize) -> PyResult<()> {
        let job = Job { product, panicked: AtomicBool::new(false) };
        // SAFETY: `body` only reads the Job through a shared reference; GOMP_parallel returns after every thread
        // of the team has returned from `body`, so the Job outlives every use.
        unsafe { parallel(body, &job as *const Job as *mut c_void, threads as c_uint, 0) };
        if job.panicked.load(Ordering::Relaxed) {
            return Err(PyRuntimeError::new_err("internal error in nanochat._rustbpe: an int8 kernel thread panicked"));
        }
        Ok(())
    }
}

unsafe fn slice_or_empty<'a, T>(ptr: *const T, len: usize) -> &'a [T] {
    if len == 0 {
        &[]
    } else {
        std::slice::from_raw_parts(ptr, len)
    }
}

#[pymodule]
fn _rustbpe(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyTokenizer>()?;
    m.add_function(wrap_pyfunction!(int8_matmul, m)?)?;
    m.add_function(wrap_pyfunction!(int8_use_openmp, m)?)?;
    m.add("INT8_ISA", int8mm::Isa::best().name())?;
    m.add("INT8_TILE", (int8mm::TILE_ROWS, int8mm::CHUNK))?;
    let patterns = PyDict::new(m.py());
    for (name, regex) in crate::pretokenize::PATTERNS {
        patterns.set_item(name, regex)?;
    }
    m.add("PATTERNS", patterns)?;
    Ok(())
}

/* _dcpscan: a reader of torch DCP `.metadata` pickles that calls nothing and builds no Python
 * object per entry; and a GIL-free byte-range comparison.
 *
 * Why: a 20,000-tensor `.metadata` is a 4.4 MB pickle of ~2 million opcodes. CPython's own C
 * unpickler needs ~60 ms for it (its floor: every opcode builds or touches a Python object), and
 * the per-entry Python work after it as much again, on each side. `pytest-miles compare` of two
 * such checkpoints must cost less than hashing their data (the target: 5x faster than md5sum).
 *
 * What it is: a small pickle VM over the opcodes DCP writes (protocol 2-5 binary opcodes, no
 * PUT/persistent ids/extensions), into a flat value graph (8-byte tagged values, index-addressed
 * nodes, strings as byte ranges of the input). Globals are an allowlist of DCP's own classes and
 * torch dtypes; nothing is ever imported or called. Then the graph is walked as DCP's Metadata
 * and every check of the Python reader (dcp_layout.py) is made: dtypes, sizes, chunk bounds and
 * coverage, one storage entry per chunk, relative paths, offsets, overlaps per file. The result
 * is a canonical byte string of everything a comparison must find equal (the "plan"), how far
 * into each data file the items reach, and the save ids.
 *
 * It only ever answers "this is a plain DCP checkpoint, here is its plan" or "not for me" (None):
 * anything unusual, malformed or merely unexpected returns None and the caller takes the full
 * Python path, which names the problem. So it may be stricter than the Python reader, never looser:
 * tests check both readers agree on every hostile and malformed input we have.
 *
 * Where it would differ from CPython's unpickler it declines: reads that cross a pickle frame's
 * end, dict keys Python could not hash, BUILD and REDUCE arguments Python would refuse, non-ASCII
 * strings, protocols below 2. tests/ckpt/test_dcp_native.py holds the evidence: real saves read with
 * the full path's reports, malformed and hostile files declined, and a differential fuzz (every
 * mutated file the fast path calls EQUAL, the full path must call EQUAL with the same report).
 *
 * Memory safety: every read of the input is bounds-checked before it happens; every array grows
 * through one checked helper; the walk over nested values is depth-limited (cycles included);
 * scripts/fuzz_dcpscan.sh runs mutations under ASan and UBSan. No hang: pickles may share an
 * object many times (memo), so every step of the walk is paid from a budget sized from the input.
 *
 * Parts: vm.c (the pickle VM), walk.c (DCP's Metadata, the plan), this file (the Python module).
 */
#include "dcpscan.h"

int dcpscan_fail_line;

/* ---- Python interface ----------------------------------------------------------------------- */

static PyObject *str_of(P *p, V v)
{
    uint32_t n;
    const unsigned char *b = sbytes(p, v, &n);
    return PyUnicode_DecodeASCII((const char *)b, n, "strict");
}

static PyObject *id_of(P *p, V v)
{
    if (v == VNONE)
        Py_RETURN_NONE;
    if (TAG(v) == T_STR)
        return str_of(p, v);
    Node *parts = &p->nodes[PAY(node_of(p, v, N_REDUCE)->u.v)];
    PyObject *t = PyTuple_New(parts->len);
    if (!t)
        return NULL;
    for (uint32_t j = 0; j < parts->len; j++) {
        PyObject *s = str_of(p, item(p, parts, j));
        if (!s) {
            Py_DECREF(t);
            return NULL;
        }
        PyTuple_SET_ITEM(t, j, s);
    }
    return t;
}

/* The arrays of the last scan, kept for the next one (its pages are already there: a fresh
 * mapping costs a page fault per 4 KiB, ~40% of a scan) until release() gives them back. Since a
 * scan that succeeds gives back its graph and VM arrays before returning (flat peak memory: the
 * second side is usually not scanned at all, dcp_mirror.py), what is kept is the plan buffer,
 * the spans and the file table, and a declined scan's arrays. Taken
 * and given back with the GIL held: one scan at a time uses them, a concurrent one makes its own. */
static struct {
    int full;
    P p;
    Out o;
} cache;

static void take_cache(P *p, Out *o)
{
    if (!cache.full)
        return;
    p->items = cache.p.items, p->ci = cache.p.ci;
    p->nodes = cache.p.nodes, p->cn = cache.p.cn;
    p->strs = cache.p.strs, p->cs = cache.p.cs;
    p->sd = cache.p.sd, p->csd = cache.p.csd;
    p->memo = cache.p.memo, p->cm = cache.p.cm;
    p->stack = cache.p.stack, p->cst = cache.p.cst;
    p->marks = cache.p.marks, p->cmk = cache.p.cmk;
    o->plan.b = cache.o.plan.b, o->plan.c = cache.o.plan.c;
    o->spans = cache.o.spans, o->csp = cache.o.csp;
    o->files = cache.o.files, o->cf = cache.o.cf;
    cache.full = 0;
}

static void out_free(Out *o)
{
    dcpscan_arena_free(o->plan.b, o->plan.c);
    dcpscan_arena_free(o->spans, o->csp * sizeof(Span));
    dcpscan_arena_free(o->files, o->cf * sizeof(V));
}

static void put_cache(P *p, Out *o)
{
    if (cache.full) {
        dcpscan_p_free(p);
        out_free(o);
        return;
    }
    memset(&cache, 0, sizeof(cache));
    cache.p.items = p->items, cache.p.ci = p->ci;
    cache.p.nodes = p->nodes, cache.p.cn = p->cn;
    cache.p.strs = p->strs, cache.p.cs = p->cs;
    cache.p.sd = p->sd, cache.p.csd = p->csd;
    cache.p.memo = p->memo, cache.p.cm = p->cm;
    cache.p.stack = p->stack, cache.p.cst = p->cst;
    cache.p.marks = p->marks, cache.p.cmk = p->cmk;
    cache.o.plan.b = o->plan.b, cache.o.plan.c = o->plan.c;
    cache.o.spans = o->spans, cache.o.csp = o->csp;
    cache.o.files = o->files, cache.o.cf = o->cf;
    cache.full = 1;
}

static PyObject *release(PyObject *self, PyObject *unused)
{
    if (cache.full) {
        dcpscan_p_free(&cache.p);
        out_free(&cache.o);
        cache.full = 0;
    }
    Py_RETURN_NONE;
}

/* The VM's working arrays (memo, stack, marks): the walk needs the graph only. Given back at once,
 * so that the walk's plan never sits beside them (peak memory at 50,000 tensors). */
static void drop_vm_arrays(P *p)
{
    dcpscan_arena_free(p->memo, p->cm * sizeof(*p->memo));
    dcpscan_arena_free(p->stack, p->cst * sizeof(V));
    dcpscan_arena_free(p->marks, p->cmk * sizeof(uint32_t));
    p->memo = NULL, p->stack = NULL, p->marks = NULL;
    p->nm = p->cm = p->nst = p->cst = p->nmk = p->cmk = 0;
}

static PyObject *build_result(P *p, Out *o)
{
    /* files: [(name, how far into it the items reach)]; the graph is given back before the plan is
     * copied into a Python bytes object (the copy and the graph never coexist) */
    PyObject *files = NULL, *res = NULL, *plan = NULL, *sid = NULL, *cid = NULL;
    int64_t *ends = calloc(o->nf ? o->nf : 1, sizeof(int64_t));
    if (!ends)
        return PyErr_NoMemory();
    for (size_t k = 0; k < o->nsp; k++) {
        Span *sp = &o->spans[k];
        if (sp->off + sp->len > ends[sp->file])
            ends[sp->file] = sp->off + sp->len;
    }
    if (!(files = PyList_New((Py_ssize_t)o->nf)))
        goto out;
    for (size_t k = 0; k < o->nf; k++) {
        PyObject *name = str_of(p, o->files[k]);
        if (!name)
            goto out;
        PyObject *t = Py_BuildValue("(NL)", name, (long long)ends[k]);
        if (!t)
            goto out;
        PyList_SET_ITEM(files, (Py_ssize_t)k, t);
    }
    if (!(sid = id_of(p, o->save_id)) || !(cid = id_of(p, o->ckpt)))
        goto out;
    dcpscan_p_free(p);
    if (!(plan = PyBytes_FromStringAndSize((const char *)o->plan.b, (Py_ssize_t)o->plan.n)))
        goto out;
    res = Py_BuildValue("{s:O,s:O,s:L,s:L,s:O,s:O}", "plan", plan, "files", files, "items",
                        (long long)o->items, "nbytes", (long long)o->nbytes, "save_id", sid, "checkpoint_id", cid);
out:
    free(ends);
    Py_XDECREF(files);
    Py_XDECREF(plan);
    Py_XDECREF(sid);
    Py_XDECREF(cid);
    return res;
}

PyDoc_STRVAR(scan_doc, "scan(data: bytes) -> dict | None\n\n"
                       "The plan of a DCP `.metadata` (see the module source), or None: not a plain DCP "
                       "checkpoint this reader vouches for (take the full Python path).");

/* the scan of `n` bytes at `d` (fd >= 0: read from that file into `d` as the VM goes) */
static PyObject *scan_bytes(const unsigned char *d, size_t n, int fd)
{
    P p = {0};
    Out o = {0};
    V root;
    PyObject *res = NULL;
    take_cache(&p, &o);
    dcpscan_fail_line = 0;
    p.budget = 16 * (int64_t)n + (1 << 20);
    p.d = d;
    p.n = n;
    p.from_fd = fd >= 0, p.fd = fd;
    int ok;
    Py_BEGIN_ALLOW_THREADS /* C data only until build_result: two sides scan on two cores */
    ok = p.n <= UINT32_MAX && dcpscan_run(&p, &root) == 0;
    if (ok)
        drop_vm_arrays(&p);
    ok = ok && dcpscan_walk(&p, root, &o) == 0;
    Py_END_ALLOW_THREADS
    if (p.nomem || o.plan.nomem)
        PyErr_NoMemory();
    else if (!ok) {
        Py_INCREF(Py_None);
        res = Py_None;
    } else
        res = build_result(&p, &o);
    put_cache(&p, &o);
    return res;
}

static PyObject *scan(PyObject *self, PyObject *arg)
{
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *res = scan_bytes(view.buf, (size_t)view.len, -1);
    PyBuffer_Release(&view);
    return res;
}

PyDoc_STRVAR(scan_fd_doc, "scan_fd(fd, size) -> dict | None\n\n"
                          "scan() of the first `size` bytes of an open regular file, read as the reader goes "
                          "(the pages already read are given back: peak memory is the plan's, not the file's). "
                          "A read error or a file shorter than `size`: None (declined).");

static PyObject *scan_fd(PyObject *self, PyObject *args)
{
    int fd;
    long long size;
    if (!PyArg_ParseTuple(args, "iL", &fd, &size))
        return NULL;
    if (fd < 0 || size < 0 || (unsigned long long)size > UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "bad descriptor or size");
        return NULL;
    }
    unsigned char *buf = dcpscan_arena_realloc(NULL, 0, (size_t)size ? (size_t)size : 1); /* pages touched as read */
    if (!buf)
        return PyErr_NoMemory();
    PyObject *res = scan_bytes(buf, (size_t)size, fd);
    dcpscan_arena_free(buf, (size_t)size ? (size_t)size : 1);
    return res;
}

/* ---- byte ranges ------------------------------------------------------------------------- */

/* Read buffers start on a page: the kernel's copy into a buffer 16 bytes past a page boundary (where
 * malloc puts a large block) is several times slower on some CPUs (measured 3.9-5.4x on an AMD
 * EPYC), and that copy is most of a comparison's CPU time. */
#define BLOCK ((size_t)1 << 18) /* 256 KiB: both blocks stay in L2 for the memcmp (1 MiB measured 1.2-1.5x cat, this 1.1x) */
#define ALIGN ((size_t)4096)

static int pread_full(int fd, unsigned char *buf, size_t want, long long off, int *err)
{
    size_t got = 0;
    while (got < want) {
        ssize_t r = pread(fd, buf + got, want - got, (off_t)(off + (long long)got));
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            *err = errno;
            return -1;
        }
        if (r == 0)
            return -2; /* the file shrank */
        got += (size_t)r;
    }
    return 0;
}

/* -1: equal; -2: a file is shorter than the range; else the offset (from the range's start) of the
 * first differing byte, or, with `exact` 0, of the first differing block. The GIL is released. */
static long long first_diff_of(int fa, long long oa, int fb, long long ob, long long len, int exact, int *err)
{
    unsigned char *ba = NULL, *bb = NULL;
    if (posix_memalign((void **)&ba, ALIGN, BLOCK) || posix_memalign((void **)&bb, ALIGN, BLOCK)) {
        free(ba);
        *err = ENOMEM;
        return -1;
    }
    long long result = -1, done = 0;
    while (done < len) {
        size_t want = (size_t)(len - done < (long long)BLOCK ? len - done : (long long)BLOCK);
        int r = pread_full(fa, ba, want, oa + done, err);
        if (!r)
            r = pread_full(fb, bb, want, ob + done, err);
        if (r) {
            result = r == -2 ? -2 : -1;
            break;
        }
        if (memcmp(ba, bb, want) != 0) {
            size_t k = 0;
            if (exact) /* the first differing byte: memcmp over halves would be no faster here */
                while (ba[k] == bb[k])
                    k++;
            result = done + (long long)k;
            break;
        }
        done += (long long)want;
    }
    free(ba);
    free(bb);
    return result;
}

static PyObject *range_result(long long result, int err)
{
    if (err == ENOMEM)
        return PyErr_NoMemory();
    if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromLongLong(result);
}

PyDoc_STRVAR(cmp_doc, "cmp_range(fd_a, fd_b, offset, length) -> int\n\n"
                      "-1 when bytes [offset, offset + length) of both files are equal, else the offset "
                      "(from `offset`) of the first 256 KiB block that differs; -2 when a file is shorter "
                      "than that (it shrank). Reads with pread into page-aligned buffers, the GIL released.");

static PyObject *cmp_range(PyObject *self, PyObject *args)
{
    int fa, fb, err = 0;
    long long off, len, result;
    if (!PyArg_ParseTuple(args, "iiLL", &fa, &fb, &off, &len))
        return NULL;
    if (off < 0 || len < 0) {
        PyErr_SetString(PyExc_ValueError, "negative offset or length");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    result = first_diff_of(fa, off, fb, off, len, 0, &err);
    Py_END_ALLOW_THREADS
    return range_result(result, err);
}

PyDoc_STRVAR(first_diff_doc, "first_diff(fd_a, offset_a, fd_b, offset_b, length) -> int\n\n"
                             "-1 when bytes [offset_a, +length) of file A equal [offset_b, +length) of file B, "
                             "else the offset (from the range's start) of the first differing byte; -2 when a "
                             "file is shorter than that (it shrank). Page-aligned buffers, the GIL released.");

static PyObject *first_diff(PyObject *self, PyObject *args)
{
    int fa, fb, err = 0;
    long long oa, ob, len, result;
    if (!PyArg_ParseTuple(args, "iLiLL", &fa, &oa, &fb, &ob, &len))
        return NULL;
    if (oa < 0 || ob < 0 || len < 0) {
        PyErr_SetString(PyExc_ValueError, "negative offset or length");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    result = first_diff_of(fa, oa, fb, ob, len, 1, &err);
    Py_END_ALLOW_THREADS
    return range_result(result, err);
}

PyDoc_STRVAR(diff_elements_doc,
             "diff_elements(fd_a, offset_a, fd_b, offset_b, length, itemsize, limit) -> (count, index, a, b)\n\n"
             "The elements (of `itemsize` bytes) of two byte ranges that differ: how many, and for the first "
             "`limit` of them their indices (an array('q')-compatible bytes of int64) and their bytes on each "
             "side. Reads as first_diff does (page-aligned buffers, the GIL released); raises OSError, "
             "ValueError for a range that is not whole elements, EOFError when a file shrank.");

static PyObject *diff_elements(PyObject *self, PyObject *args)
{
    int fa, fb, err = 0, shrank = 0;
    long long oa, ob, len, isz, limit, count = 0;
    if (!PyArg_ParseTuple(args, "iLiLLLL", &fa, &oa, &fb, &ob, &len, &isz, &limit))
        return NULL;
    if (oa < 0 || ob < 0 || len < 0 || isz < 1 || isz > 16 || len % isz || limit < 0 || limit > (1 << 24)) {
        PyErr_SetString(PyExc_ValueError, "bad range, item size or limit");
        return NULL;
    }
    size_t block = BLOCK - BLOCK % (size_t)isz; /* whole elements per block */
    unsigned char *ba = NULL, *bb = NULL, *va = malloc((size_t)(limit * isz) + 1),
                  *vb = malloc((size_t)(limit * isz) + 1);
    int64_t *idx = malloc((size_t)limit * sizeof(int64_t) + 1);
    if (!va || !vb || !idx || posix_memalign((void **)&ba, ALIGN, BLOCK) || posix_memalign((void **)&bb, ALIGN, BLOCK)) {
        free(va), free(vb), free(idx), free(ba);
        return PyErr_NoMemory();
    }
    Py_BEGIN_ALLOW_THREADS
    long long done = 0;
    while (done < len) {
        size_t want = (size_t)(len - done < (long long)block ? len - done : (long long)block);
        int r = pread_full(fa, ba, want, oa + done, &err);
        if (!r)
            r = pread_full(fb, bb, want, ob + done, &err);
        if (r) {
            shrank = r == -2;
            break;
        }
        if (memcmp(ba, bb, want) != 0)
            for (size_t k = 0; k < want; k += (size_t)isz)
                if (memcmp(ba + k, bb + k, (size_t)isz) != 0) {
                    if (count < limit) {
                        idx[count] = (done + (long long)k) / isz;
                        memcpy(va + count * isz, ba + k, (size_t)isz);
                        memcpy(vb + count * isz, bb + k, (size_t)isz);
                    }
                    count++;
                }
        done += (long long)want;
    }
    Py_END_ALLOW_THREADS
    free(ba);
    free(bb);
    PyObject *out = NULL;
    if (err) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
    } else if (shrank) {
        PyErr_SetString(PyExc_EOFError, "a file shrank while reading");
    } else {
        long long kept = count < limit ? count : limit;
        out = Py_BuildValue("(Ly#y#y#)", count, (const char *)idx, (Py_ssize_t)(kept * 8), (const char *)va,
                            (Py_ssize_t)(kept * isz), (const char *)vb, (Py_ssize_t)(kept * isz));
    }
    free(va);
    free(vb);
    free(idx);
    return out;
}

static PyObject *declined_at(PyObject *self, PyObject *unused) { return PyLong_FromLong(dcpscan_fail_line); }

static PyObject *dtypes(PyObject *self, PyObject *unused)
{
    PyObject *d = PyDict_New();
    if (!d)
        return NULL;
    for (int i = 0; i < DCPSCAN_NDTYPES; i++) {
        PyObject *v = PyLong_FromLong(DCPSCAN_ITEMSIZES[i]);
        if (!v || PyDict_SetItemString(d, DCPSCAN_DTYPES[i], v)) {
            Py_XDECREF(v);
            Py_DECREF(d);
            return NULL;
        }
        Py_DECREF(v);
    }
    return d;
}

static PyMethodDef methods[] = {
    {"scan", scan, METH_O, scan_doc},
    {"scan_fd", scan_fd, METH_VARARGS, scan_fd_doc},
    {"cmp_range", cmp_range, METH_VARARGS, cmp_doc},
    {"first_diff", first_diff, METH_VARARGS, first_diff_doc},
    {"diff_elements", diff_elements, METH_VARARGS, diff_elements_doc},
    {"dtypes", dtypes, METH_NOARGS, "{dtype name: item size} this reader knows"},
    {"declined_at", declined_at, METH_NOARGS, "the source line of the check that declined the last scan (0: none)"},
    {"release", release, METH_NOARGS, "give back the memory kept from the last scan for the next one"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_dcpscan",
                                    "Native reader of torch DCP .metadata (see the source's header).", -1, methods};

PyMODINIT_FUNC PyInit__dcpscan(void) { return PyModule_Create(&module); }

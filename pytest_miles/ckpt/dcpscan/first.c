/* first.c: `compare --first` of a differing plain DCP pair, answered by the `pytest-miles` executable
 * (front.c) with the line the Python command line prints, without starting Python.
 *
 * Why: `cmp` names a byte flipped near the start of a 1 GiB pair in ~4 ms; the Python command line
 * needs ~60 ms before it reads a byte (interpreter, imports, `.metadata`). This reads what Python's
 * `--first` reads (layout_compare.py, byte_ranges.py, element_diff.element_first) and nothing more:
 * the items of the one data file in file order up to the first differing byte, the zip directory and
 * pickle of the torch.save blob holding it (both sides), and one element a side.
 *
 * It answers only where it is sure to name what Python names; everywhere else it returns -1 and
 * front.c hands the pair over (never a different verdict):
 * - one data file (Python's threads take several files at once: which is found first is not fixed);
 * - the item holding the first differing byte belongs to a tensor stored as one chunk covering it,
 *   raw or as a torch.save blob, of a dtype element_diff decodes; and every item after it in the file
 *   belongs to a later entry (Python reports the first in checkpoint order of what its threads found:
 *   then that is this one whatever else they found);
 * - the blob is exactly what torch.save writes for one tensor: a stored (uncompressed) zip with its
 *   zip64 end records, no extra fields, one `data.pkl` whose pickle is _rebuild_tensor_v2's template
 *   opcode by opcode (a typed storage, offset, size, stride, requires_grad, an empty OrderedDict), the
 *   dtype and shape of the plan, contiguous, the elements inside their entry; the same on both sides;
 * - the first differing byte lies in the tensor's elements (not in the container around them).
 * Safety: every read is a bounded pread of the files opened by front.c (regular, O_NONBLOCK); sizes
 * read from the file are checked before use; nothing is allocated from a file's numbers beyond the
 * item count of the plan front.c already holds.
 */
/* built with -DDCPSCAN_NO_PYTHON (setup.py), as front.c */
#include "dcpscan.h"
#include <math.h>
#include <stdio.h>

#define BLOCK ((size_t)1 << 18) /* read blocks: page-aligned, 256 KiB (module.c, front.c) */
#define CHUNK ((int64_t)2 << 20) /* byte_ranges.CHUNK: split() keeps a file whole below 4 of these a worker */
#define TAIL ((size_t)65536)     /* a blob's zip directory and end records are read if they fit in this */
#define PKL_MAX ((size_t)4096)   /* one tensor's data.pkl is ~150 bytes */
#define NDIM_MAX 64

/* ---- the plan (walk.c writes it: zigzag LEB128 numbers, length-prefixed strings) ------------- */

typedef struct {
    const unsigned char *b;
    size_t n, at;
    int bad;
} Rd;

static int64_t get64(Rd *r)
{
    uint64_t u = 0;
    for (int shift = 0; shift < 70; shift += 7) {
        if (r->at >= r->n) {
            r->bad = 1;
            return 0;
        }
        unsigned char c = r->b[r->at++];
        u |= (uint64_t)(c & 0x7f) << shift;
        if (!(c & 0x80))
            return (int64_t)(u >> 1) ^ -(int64_t)(u & 1);
    }
    r->bad = 1;
    return 0;
}

static int get8(Rd *r)
{
    if (r->at >= r->n) {
        r->bad = 1;
        return 0;
    }
    return r->b[r->at++];
}

static const unsigned char *getstr(Rd *r, size_t *len)
{
    int64_t n = get64(r);
    if (r->bad || n < 0 || (uint64_t)n > r->n - r->at) {
        r->bad = 1;
        return NULL;
    }
    const unsigned char *s = r->b + r->at;
    r->at += (size_t)n;
    *len = (size_t)n;
    return s;
}

typedef struct {
    const unsigned char *name;
    size_t nlen;
    int tensor, dt, ndim, nch, enc; /* enc of its one chunk: 'r' raw, 's' torch.save, 't' transformed */
    int whole;                      /* one chunk at offsets 0 of the tensor's shape */
    size_t shape_at;                /* its shape in Plan.dims */
} Entry;

typedef struct {
    int64_t off, len;
    uint32_t entry, seq; /* seq: the order Python's stable sort keeps for equal offsets */
} It;

typedef struct {
    Entry *e;
    It *it;
    int64_t *dims;
    size_t ne, ni, nd;
} Plan;

static void plan_free(Plan *p)
{
    free(p->e);
    free(p->it);
    free(p->dims);
}

/* the entries and items of the plan, all in the one data file `file`: 0, or -1 */
static int plan_read(const Buf *buf, size_t at, const char *file, Plan *p)
{
    Rd r = {buf->b, buf->n, at, 0};
    memset(p, 0, sizeof(*p));
    if (get8(&r) != 'E')
        return -1;
    int64_t ne = get64(&r);
    if (r.bad || ne < 1 || (uint64_t)ne > buf->n)
        return -1;
    size_t cap_i = (size_t)ne, cap_d = 16;
    p->e = calloc((size_t)ne, sizeof(Entry));
    p->it = malloc(cap_i * sizeof(It));
    p->dims = malloc(cap_d * sizeof(int64_t));
    if (!p->e || !p->it || !p->dims)
        return -1;
    for (size_t k = 0; k < (size_t)ne; k++) {
        Entry *e = &p->e[k];
        e->nlen = 0;
        e->name = getstr(&r, &e->nlen);
        int kind = get8(&r);
        e->tensor = kind == 'T';
        e->dt = -1;
        if (kind == 'T') {
            e->dt = get8(&r);
            int64_t nd = get64(&r);
            if (r.bad || nd < 0 || nd > NDIM_MAX)
                return -1;
            e->ndim = (int)nd;
            if (p->nd + 2 * (size_t)nd + 1 > cap_d) {
                cap_d = (p->nd + 2 * (size_t)nd + 1) * 2;
                int64_t *m = realloc(p->dims, cap_d * sizeof(int64_t));
                if (!m)
                    return -1;
                p->dims = m;
            }
            e->shape_at = p->nd;
            for (int j = 0; j < e->ndim; j++)
                p->dims[p->nd++] = get64(&r);
        } else if (kind != 'B')
            return -1;
        int64_t nch = get64(&r);
        if (r.bad || nch < 1 || nch > INT32_MAX)
            return -1;
        e->nch = (int)nch;
        e->whole = nch == 1;
        for (int64_t c = 0; c < nch; c++) {
            if (e->tensor)
                for (int j = 0; j < e->ndim; j++) {
                    int64_t o = get64(&r), s = get64(&r);
                    if (o != 0 || s != p->dims[e->shape_at + (size_t)j])
                        e->whole = 0;
                }
            size_t flen = 0;
            const unsigned char *fname = getstr(&r, &flen);
            int64_t off = get64(&r), len = get64(&r);
            int enc = get8(&r);
            if (r.bad || flen != strlen(file) || memcmp(fname, file, flen) || off < 0 || len < 0)
                return -1;
            e->enc = enc;
            if (p->ni == cap_i) {
                cap_i *= 2;
                It *m = realloc(p->it, cap_i * sizeof(It));
                if (!m)
                    return -1;
                p->it = m;
            }
            p->it[p->ni] = (It){off, len, (uint32_t)k, (uint32_t)p->ni};
            p->ni++;
        }
    }
    p->ne = (size_t)ne;
    return r.bad || r.at != buf->n ? -1 : 0;
}

static int by_offset(const void *x, const void *y)
{
    const It *a = x, *b = y;
    if (a->off != b->off)
        return a->off < b->off ? -1 : 1;
    return a->seq < b->seq ? -1 : a->seq > b->seq;
}

/* ---- reading ------------------------------------------------------------------------------- */

/* the offset of the first differing byte of [off, off + len) on both sides, -1: equal, -2: a read failed */
static int64_t first_byte(int fa, int fb, int64_t off, int64_t len, unsigned char *ba, unsigned char *bb)
{
    for (int64_t done = 0; done < len; done += (int64_t)BLOCK) {
        size_t want = len - done < (int64_t)BLOCK ? (size_t)(len - done) : BLOCK;
        if (dcpscan_pread_full(fa, ba, want, off + done) || dcpscan_pread_full(fb, bb, want, off + done))
            return -2;
        if (memcmp(ba, bb, want))
            for (size_t j = 0; j < want; j++)
                if (ba[j] != bb[j])
                    return off + done + (int64_t)j;
    }
    return -1;
}

/* ---- one torch.save blob: where its tensor's elements lie ------------------------------------ */

static uint64_t le(const unsigned char *p, int n)
{
    uint64_t v = 0;
    for (int j = n - 1; j >= 0; j--)
        v = (v << 8) | p[j];
    return v;
}

typedef struct {
    int dt;
    int64_t soff, size[NDIM_MAX], stride[NDIM_MAX];
    int ndim;
    char key[32];
} Pkl;

static const char *const STORAGES[][2] = {
    {"DoubleStorage", "float64"}, {"FloatStorage", "float32"}, {"HalfStorage", "float16"},
    {"BFloat16Storage", "bfloat16"}, {"LongStorage", "int64"}, {"IntStorage", "int32"},
    {"ShortStorage", "int16"}, {"CharStorage", "int8"}, {"ByteStorage", "uint8"}, {"BoolStorage", "bool"}};

/* _rebuild_tensor_v2's pickle as torch.save writes it for one tensor (protocol 2), opcode by opcode */
typedef struct {
    const unsigned char *d;
    size_t n, at;
    int bad;
} Pk;

static int pk_is(Pk *k, const char *bytes, size_t len)
{
    if (k->bad || len > k->n - k->at || memcmp(k->d + k->at, bytes, len))
        return k->bad = 1, 0;
    k->at += len;
    return 1;
}

static void pk_memo(Pk *k) /* BINPUT / LONG_BINPUT: the memo is never read back here */
{
    if (k->bad || k->at >= k->n)
        k->bad = 1;
    else if (k->d[k->at] == 'q' && k->n - k->at >= 2)
        k->at += 2;
    else if (k->d[k->at] == 'r' && k->n - k->at >= 5)
        k->at += 5;
    else
        k->bad = 1;
}

static int64_t pk_int(Pk *k) /* BININT1, BININT2, BININT (>= 0), LONG1 (>= 0, at most 7 bytes) */
{
    if (k->bad || k->at >= k->n)
        return k->bad = 1, 0;
    unsigned char c = k->d[k->at];
    size_t avail = k->n - k->at - 1;
    const unsigned char *p = k->d + k->at + 1;
    int64_t v = -1;
    if (c == 'K' && avail >= 1)
        v = p[0], k->at += 2;
    else if (c == 'M' && avail >= 2)
        v = (int64_t)le(p, 2), k->at += 3;
    else if (c == 'J' && avail >= 4 && !(p[3] & 0x80))
        v = (int64_t)le(p, 4), k->at += 5;
    else if (c == 0x8a && avail >= 1 && p[0] >= 1 && p[0] <= 7 && avail >= 1u + p[0] && !(p[p[0]] & 0x80))
        v = (int64_t)le(p + 1, p[0]), k->at += 2 + p[0];
    if (v < 0)
        k->bad = 1;
    return v;
}

static size_t pk_str(Pk *k, const unsigned char **s) /* BINUNICODE, SHORT_BINUNICODE */
{
    if (k->bad || k->at >= k->n)
        return k->bad = 1, 0;
    unsigned char c = k->d[k->at];
    size_t head = c == 'X' ? 5 : c == 0x8c ? 2 : 0;
    if (!head || k->n - k->at < head)
        return k->bad = 1, 0;
    size_t len = (size_t)le(k->d + k->at + 1, (int)head - 1);
    if (len > k->n - k->at - head)
        return k->bad = 1, 0;
    *s = k->d + k->at + head;
    k->at += head + len;
    return len;
}

static int pk_tuple(Pk *k, int64_t *out, int *n) /* ), or ints then TUPLE1/2/3, or MARK ints TUPLE */
{
    *n = 0;
    if (k->bad || k->at >= k->n)
        return k->bad = 1, 0;
    if (k->d[k->at] == ')') {
        k->at++;
        return 1;
    }
    int marked = k->d[k->at] == '(';
    k->at += marked;
    while (!k->bad && k->at < k->n && k->d[k->at] != 't' && !(k->d[k->at] >= 0x85 && k->d[k->at] <= 0x87)) {
        if (*n == NDIM_MAX)
            return k->bad = 1, 0;
        out[(*n)++] = pk_int(k);
    }
    if (k->bad || k->at >= k->n)
        return k->bad = 1, 0;
    unsigned char c = k->d[k->at++];
    if (marked ? c != 't' : (c == 't' || c - 0x84 != *n))
        k->bad = 1;
    return !k->bad;
}

static int pkl_read(const unsigned char *d, size_t n, Pkl *out)
{
    Pk k = {d, n, 0, 0};
    const unsigned char *s;
    size_t len;
    pk_is(&k, "\x80\x02", 2);
    pk_is(&k, "ctorch._utils\n_rebuild_tensor_v2\n", 33);
    pk_memo(&k);
    pk_is(&k, "((", 2);
    len = pk_str(&k, &s);
    if (k.bad || len != 7 || memcmp(s, "storage", 7))
        return -1;
    pk_memo(&k);
    pk_is(&k, "ctorch\n", 7);
    const unsigned char *cls = k.d + k.at;
    const unsigned char *nl = k.bad ? NULL : memchr(cls, '\n', k.n - k.at);
    if (!nl)
        return -1;
    out->dt = -1;
    for (size_t j = 0; j < sizeof(STORAGES) / sizeof(*STORAGES); j++)
        if ((size_t)(nl - cls) == strlen(STORAGES[j][0]) && !memcmp(cls, STORAGES[j][0], (size_t)(nl - cls)))
            for (int t = 0; t < DCPSCAN_NDTYPES; t++)
                if (!strcmp(DCPSCAN_DTYPES[t], STORAGES[j][1]))
                    out->dt = t;
    if (out->dt < 0)
        return -1;
    k.at = (size_t)(nl - k.d) + 1;
    pk_memo(&k);
    len = pk_str(&k, &s);
    if (k.bad || len == 0 || len >= sizeof(out->key))
        return -1;
    for (size_t j = 0; j < len; j++)
        if (s[j] < '0' || s[j] > '9')
            return -1;
    memcpy(out->key, s, len);
    out->key[len] = 0;
    pk_memo(&k);
    len = pk_str(&k, &s);
    if (k.bad || len != 3 || memcmp(s, "cpu", 3))
        return -1;
    pk_memo(&k);
    pk_int(&k); /* the storage's element count: Python reads the storage's size from its zip entry */
    pk_is(&k, "t", 1);
    pk_memo(&k);
    pk_is(&k, "Q", 1);
    out->soff = pk_int(&k);
    int ns, nt;
    pk_tuple(&k, out->size, &ns);
    if (ns)
        pk_memo(&k); /* the pickler memoizes no empty tuple */
    pk_tuple(&k, out->stride, &nt);
    if (nt)
        pk_memo(&k);
    if (k.bad || ns != nt || k.at >= k.n || (k.d[k.at] != 0x88 && k.d[k.at] != 0x89))
        return -1;
    k.at++;
    pk_is(&k, "ccollections\nOrderedDict\n", 25);
    pk_memo(&k);
    pk_is(&k, ")R", 2);
    pk_memo(&k);
    pk_is(&k, "t", 1);
    pk_memo(&k);
    pk_is(&k, "R", 1);
    pk_memo(&k);
    pk_is(&k, ".", 1);
    out->ndim = ns;
    return k.bad || k.at != k.n ? -1 : 0;
}

/* [*start, *start + *len) of the blob [off, off + len): its tensor's elements, as element_diff's
 * _chunk_range finds them through load_torch; the pickle's reading in *pkl. 0, or -1: not sure. */
static int blob_elements(int fd, int64_t off, int64_t len, Pkl *pkl, int64_t *start, int64_t *nbytes)
{
    unsigned char tail[TAIL], cd[TAIL], head[30], pbuf[PKL_MAX];
    if (len < 98)
        return -1;
    size_t tn = len < (int64_t)TAIL ? (size_t)len : TAIL;
    if (dcpscan_pread_full(fd, tail, tn, off + len - (int64_t)tn))
        return -1;
    const unsigned char *e = tail + tn - 22, *loc = e - 20, *z = loc - 56;
    if (le(e, 4) != 0x06054b50 || le(e + 4, 4) != 0 || le(e + 20, 2) != 0)
        return -1; /* one disk, no comment */
    if (le(loc, 4) != 0x07064b50 || le(loc + 4, 4) != 0 || le(loc + 16, 4) != 1 ||
        le(loc + 8, 8) != (uint64_t)(len - 98))
        return -1;
    if (le(z, 4) != 0x06064b50 || le(z + 4, 8) != 44 || le(z + 16, 8) != 0)
        return -1;
    uint64_t n = le(z + 24, 8), cdsize = le(z + 40, 8), cdoff = le(z + 48, 8);
    if (n != le(z + 32, 8) || n < 2 || n > 64 || cdsize > TAIL || cdoff + cdsize != (uint64_t)(len - 98))
        return -1;
    if ((le(e + 8, 2) != n && le(e + 8, 2) != 0xffff) || (le(e + 10, 2) != n && le(e + 10, 2) != 0xffff) ||
        (le(e + 12, 4) != cdsize && le(e + 12, 4) != 0xffffffff) ||
        (le(e + 16, 4) != cdoff && le(e + 16, 4) != 0xffffffff))
        return -1;
    if (dcpscan_pread_full(fd, cd, (size_t)cdsize, off + (int64_t)cdoff))
        return -1;
    int64_t pkl_at = -1, pkl_len = 0, data_at = -1, data_len = 0;
    size_t prefix = 0, at = 0, npkl = 0;
    const unsigned char *names[64], *pre = NULL;
    size_t nlens[64];
    int64_t starts[64], sizes[64];
    for (uint64_t k = 0; k < n; k++) {
        if (cdsize - at < 46)
            return -1;
        const unsigned char *h = cd + at;
        size_t nl = (size_t)le(h + 28, 2), xl = (size_t)le(h + 30, 2), cl = (size_t)le(h + 32, 2);
        uint64_t csize = le(h + 20, 4), usize = le(h + 24, 4), hoff = le(h + 42, 4);
        if (le(h, 4) != 0x02014b50 || le(h + 6, 2) > 45 || (le(h + 8, 2) & 1) || le(h + 10, 2) != 0 || xl || cl ||
            le(h + 34, 2) != 0 || csize != usize || usize == 0xffffffff || hoff == 0xffffffff || !nl ||
            cdsize - at - 46 < nl)
            return -1;
        const unsigned char *name = h + 46;
        for (size_t j = 0; j < nl; j++)
            if (name[j] < 0x21 || name[j] > 0x7e)
                return -1;
        for (uint64_t j = 0; j < k; j++)
            if (nlens[j] == nl && !memcmp(names[j], name, nl))
                return -1; /* a name twice */
        if (hoff + 30 > (uint64_t)len || dcpscan_pread_full(fd, head, 30, off + (int64_t)hoff) ||
            le(head, 4) != 0x04034b50)
            return -1;
        uint64_t begin = hoff + 30 + le(head + 26, 2) + le(head + 28, 2);
        if (begin + usize > (uint64_t)len)
            return -1;
        names[k] = name, nlens[k] = nl, starts[k] = (int64_t)begin, sizes[k] = (int64_t)usize;
        if ((nl >= 9 && !memcmp(name + nl - 9, "/data.pkl", 9)) || (nl == 8 && !memcmp(name, "data.pkl", 8))) {
            npkl++;
            pkl_at = (int64_t)begin, pkl_len = (int64_t)usize, prefix = nl - 8, pre = name;
        }
        at += 46 + nl;
    }
    if (at != cdsize || npkl != 1 || pkl_len > (int64_t)PKL_MAX ||
        dcpscan_pread_full(fd, pbuf, (size_t)pkl_len, off + pkl_at) || pkl_read(pbuf, (size_t)pkl_len, pkl))
        return -1;
    size_t kl = strlen(pkl->key);
    for (uint64_t k = 0; k < n; k++)
        if (nlens[k] == prefix + 5 + kl && !memcmp(names[k], pre, prefix) && !memcmp(names[k] + prefix, "data/", 5) &&
            !memcmp(names[k] + prefix + 5, pkl->key, kl))
            data_at = starts[k], data_len = sizes[k];
    if (data_at < 0)
        return -1;
    /* LazyTensor: contiguous (dims of size 1 aside), inside its storage (byte_span, check) */
    int64_t expected = 1, isz = DCPSCAN_ITEMSIZES[pkl->dt], numel = 1;
    for (int j = pkl->ndim - 1; j >= 0; j--) {
        if (pkl->size[j] != 1 && pkl->stride[j] != expected)
            return -1;
        if (pkl->size[j] && expected > INT64_MAX / 16 / pkl->size[j])
            return -1;
        expected *= pkl->size[j];
    }
    numel = expected;
    if (numel == 0 || pkl->soff > INT64_MAX / 16 || numel > INT64_MAX / 16 / isz ||
        (pkl->soff + numel) * isz > data_len)
        return -1;
    *start = off + data_at + pkl->soff * isz;
    *nbytes = numel * isz;
    return 0;
}

/* ---- the values, as Python prints them ------------------------------------------------------- */

/* repr() of a Python float: the shortest digits that read back, fixed notation for 1e-4 <= |x| < 1e16 */
static void repr_double(double x, char *out, size_t cap)
{
    if (isnan(x)) {
        snprintf(out, cap, "nan");
        return;
    }
    if (isinf(x)) {
        snprintf(out, cap, x < 0 ? "-inf" : "inf");
        return;
    }
    if (x == 0) {
        snprintf(out, cap, signbit(x) ? "-0.0" : "0.0");
        return;
    }
    char buf[40], digits[24];
    int neg = signbit(x) != 0, nd = 0, ex = 0;
    double ax = fabs(x);
    for (int p = 1; p <= 17; p++) {
        snprintf(buf, sizeof(buf), "%.*e", p - 1, ax); /* the nearest p digits */
        nd = 0;
        for (const char *q = buf; *q && *q != 'e'; q++)
            if (*q != '.')
                digits[nd++] = *q;
        ex = atoi(strchr(buf, 'e') + 1);
        double got = strtod(buf, NULL);
        if (got == ax)
            break;
        /* the other neighbour of p digits may read back where the nearest does not (ax a power of two:
         * the doubles below it are twice as close) */
        char alt[24];
        int na = nd, ea = ex, j = nd - 1;
        memcpy(alt, digits, (size_t)nd);
        if (got < ax) {
            while (j >= 0 && alt[j] == '9')
                alt[j--] = '0';
            if (j < 0)
                alt[0] = '1', ea++;
            else
                alt[j]++;
        } else {
            while (j >= 0 && alt[j] == '0')
                alt[j--] = '9';
            if (j >= 0) /* (always: ax > 0) */
                alt[j]--;
            if (alt[0] == '0') { /* 10..0 - 1: one digit fewer */
                if (--na > 0)
                    memmove(alt, alt + 1, (size_t)na);
                ea--;
            }
        }
        char tryb[48];
        if (na)
            snprintf(tryb, sizeof(tryb), "%c.%.*se%d", alt[0], na - 1, alt + 1, ea);
        if (na && strtod(tryb, NULL) == ax) {
            memcpy(digits, alt, (size_t)na);
            nd = na, ex = ea;
            break;
        }
    }
    while (nd > 1 && digits[nd - 1] == '0')
        nd--;
    digits[nd] = 0;
    int decpt = ex + 1; /* x = 0.DIGITS * 10**decpt */
    char *o = out;
    size_t left = cap;
#define PUT(...)                                                  \
    do {                                                          \
        int w_ = snprintf(o, left, __VA_ARGS__);                  \
        if (w_ > 0 && (size_t)w_ < left)                          \
            o += w_, left -= (size_t)w_;                          \
    } while (0)
    if (neg)
        PUT("-");
    if (decpt <= -4 || decpt > 16) {
        PUT("%c", digits[0]);
        if (nd > 1)
            PUT(".%s", digits + 1);
        int e10 = decpt - 1;
        PUT("e%c%02d", e10 < 0 ? '-' : '+', e10 < 0 ? -e10 : e10);
    } else if (decpt <= 0) {
        PUT("0.");
        for (int j = 0; j < -decpt; j++)
            PUT("0");
        PUT("%s", digits);
    } else if (decpt >= nd) {
        PUT("%s", digits);
        for (int j = nd; j < decpt; j++)
            PUT("0");
        PUT(".0");
    } else
        PUT("%.*s.%s", decpt, digits, digits + decpt);
#undef PUT
}

static double half_to_double(uint16_t h)
{
    int ex = (h >> 10) & 0x1f, man = h & 0x3ff;
    double v = ex == 0 ? ldexp(man, -24) : ex == 31 ? (man ? NAN : INFINITY) : ldexp(man + 1024, ex - 25);
    return (h & 0x8000) ? -v : v;
}

/* element_diff._values of one element: repr of what struct unpacks. 0, or -1: a dtype it does not take */
static int repr_element(int dt, const unsigned char *raw, char *out, size_t cap)
{
    const char *name = DCPSCAN_DTYPES[dt];
    int size = DCPSCAN_ITEMSIZES[dt];
    uint64_t u = le(raw, size);
    if (!strcmp(name, "float64")) {
        double d;
        memcpy(&d, &u, 8);
        repr_double(d, out, cap);
    } else if (!strcmp(name, "float32") || !strcmp(name, "bfloat16")) {
        uint32_t w = !strcmp(name, "bfloat16") ? (uint32_t)u << 16 : (uint32_t)u;
        float f;
        memcpy(&f, &w, 4);
        repr_double((double)f, out, cap);
    } else if (!strcmp(name, "float16"))
        repr_double(half_to_double((uint16_t)u), out, cap);
    else if (!strcmp(name, "bool"))
        snprintf(out, cap, u ? "True" : "False");
    else if (!strncmp(name, "uint", 4))
        snprintf(out, cap, "%llu", (unsigned long long)u);
    else if (!strncmp(name, "int", 3)) {
        int sh = 64 - 8 * size;
        snprintf(out, cap, "%lld", (long long)((int64_t)(u << sh) >> sh));
    } else
        return -1;
    return 0;
}

/* ---- the answer ----------------------------------------------------------------------------- */

/* byte_ranges.split of the file's items (offset order) into `parts`: where each group begins; the
 * number of groups (a cut after the last item makes no group) */
static int groups_of(const Plan *p, int parts, size_t *first)
{
    int64_t total = 0, acc = 0;
    for (size_t k = 0; k < p->ni; k++)
        total += p->it[k].len;
    int closed = 0;
    first[0] = 0;
    if (parts < 2 || total < 4 * CHUNK * parts)
        return 1;
    double step = (double)total / parts;
    for (size_t k = 0; k < p->ni; k++) {
        acc += p->it[k].len;
        if ((double)acc >= step * (closed + 1) && closed < parts - 1)
            first[++closed] = k + 1;
    }
    return first[closed] < p->ni ? closed + 1 : closed;
}

int dcpscan_first(const Buf *plan, size_t entries_at, const char *file, int fa, int fb, int workers,
                  DcpFirst *out)
{
    Plan p = {0};
    unsigned char *ba = NULL, *bb = NULL;
    int rc = -1;
    memset(out, 0, sizeof(*out));
    if (workers > 64 || plan_read(plan, entries_at, file, &p) || !p.ni)
        goto done; /* (more groups than this counts: Python's) */
    qsort(p.it, p.ni, sizeof(It), by_offset);
    if (posix_memalign((void **)&ba, 4096, BLOCK) || posix_memalign((void **)&bb, 4096, BLOCK))
        goto done;
    /* runs of items adjacent in the file, in file order, up to the first differing byte */
    int64_t at = -1;
    size_t x = 0;
    for (size_t i = 0; i < p.ni && at == -1;) {
        size_t j = i + 1;
        int64_t end = p.it[i].off + p.it[i].len;
        while (j < p.ni && p.it[j].off == end)
            end += p.it[j++].len;
        at = first_byte(fa, fb, p.it[i].off, end - p.it[i].off, ba, bb);
        if (at == -2)
            goto done;
        if (at >= 0)
            for (x = i; p.it[x].off + p.it[x].len <= at; x++)
                ;
        i = j;
    }
    if (at < 0)
        goto done; /* no differing byte in any item: Python's report (container bytes, notes) */
    const It *ix = &p.it[x];
    const Entry *e = &p.e[ix->entry];
    for (size_t k = x + 1; k < p.ni; k++)
        if (p.it[k].entry <= ix->entry)
            goto done; /* an earlier entry after it in the file: Python's threads could name that one */
    if (!e->tensor || !e->whole || (e->enc != 's' && e->enc != 'r'))
        goto done;
    for (size_t j = 0; j < e->nlen; j++)
        if (e->name[j] < 0x20 || e->name[j] > 0x7e)
            goto done;
    int isz = DCPSCAN_ITEMSIZES[e->dt];
    int64_t numel = 1, start = ix->off, nbytes = ix->len;
    const int64_t *shape = p.dims + e->shape_at;
    for (int j = 0; j < e->ndim; j++)
        numel *= shape[j]; /* walk.c checked the product */
    if (e->enc == 's') {
        Pkl pa, pb;
        int64_t sa, sb, na, nb;
        if (blob_elements(fa, ix->off, ix->len, &pa, &sa, &na) || blob_elements(fb, ix->off, ix->len, &pb, &sb, &nb) ||
            sa != sb || na != nb || pa.dt != pb.dt || pa.ndim != pb.ndim || pa.soff != pb.soff || pa.dt != e->dt ||
            pa.ndim != e->ndim)
            goto done;
        for (int j = 0; j < e->ndim; j++)
            if (pa.size[j] != shape[j] || pb.size[j] != shape[j] || pa.stride[j] != pb.stride[j])
                goto done;
        start = sa, nbytes = na;
    }
    if (nbytes != numel * isz || at < start || at >= start + nbytes)
        goto done; /* raw of another length, or the difference is in the container's bytes */
    int64_t k = (at - start) / isz;
    unsigned char ea[16], eb[16];
    char va[64], vb[64], bits[2][40];
    if (dcpscan_pread_full(fa, ea, (size_t)isz, start + k * isz) ||
        dcpscan_pread_full(fb, eb, (size_t)isz, start + k * isz) ||
        repr_element(e->dt, ea, va, sizeof(va)) || repr_element(e->dt, eb, vb, sizeof(vb)))
        goto done;
    for (int s = 0; s < 2; s++) {
        const unsigned char *raw = s ? eb : ea;
        char *o = bits[s];
        o += sprintf(o, "0x");
        for (int j = isz - 1; j >= 0; j--)
            o += sprintf(o, "%02x", raw[j]);
    }
    /* the index, row-major; the shape */
    char idx[NDIM_MAX * 22 + 2] = "", shp[NDIM_MAX * 22 + 2] = "";
    int64_t rest = k, coord[NDIM_MAX];
    for (int j = e->ndim - 1; j >= 0; j--)
        coord[j] = rest % shape[j], rest /= shape[j];
    for (int j = 0; j < e->ndim; j++) {
        sprintf(idx + strlen(idx), "%s%lld", j ? ", " : "", (long long)coord[j]);
        sprintf(shp + strlen(shp), "%s%lld", j ? ", " : "", (long long)shape[j]);
    }
    size_t need = e->nlen + strlen(idx) + strlen(shp) + strlen(va) + strlen(vb) + 200;
    out->name = malloc(e->nlen + 1);
    out->detail = malloc(need);
    if (!out->name || !out->detail)
        goto done;
    memcpy(out->name, e->name, e->nlen);
    out->name[e->nlen] = 0;
    snprintf(out->detail, need,
             "%s: first differing element at [%s] (%s, shape [%s]): %s (%s) vs %s (%s); --first: the rest not compared",
             out->name, idx, DCPSCAN_DTYPES[e->dt], shp, va, bits[0], vb, bits[1]);
    /* what Python's early stop counts: the items of the differing one's group up to it (the other
     * groups' threads stop at their next run, most often before finishing one: 0) */
    size_t first[65];
    int g = 0, ng = groups_of(&p, workers, first);
    while (g + 1 < ng && first[g + 1] <= x)
        g++;
    for (size_t j = first[g]; j <= x; j++)
        out->items++, out->nbytes += 2 * p.it[j].len;
    rc = 0;
done:
    if (rc) {
        free(out->name);
        free(out->detail);
        out->name = out->detail = NULL;
    }
    free(ba);
    free(bb);
    plan_free(&p);
    return rc;
}

/* dcpscan.h: what the native DCP `.metadata` reader's parts share (see module.c for why it
 * exists and why it can be trusted with other people's files).
 *   vm.c     the pickle VM: opcodes into a flat value graph, globals from an allowlist
 *   walk.c   the graph walked as DCP's Metadata: every check of dcp_layout.py, the canonical plan
 *   module.c the Python module: scan(), cmp_range(), the memory kept between scans
 *   front.c  the `pytest-miles` executable: `compare` of two equal DCP dirs without starting Python
 *            (built with DCPSCAN_NO_PYTHON: vm.c and walk.c use no Python API)
 *   first.c  its `compare --first` of a differing pair: the first differing element, as Python names it
 */
#ifndef DCPSCAN_H
#define DCPSCAN_H
#define _GNU_SOURCE /* mremap */
#ifndef DCPSCAN_NO_PYTHON
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#endif
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#ifdef __linux__
#include <sys/mman.h>
#endif

/* nothing of ours is visible outside the module (only PyInit__dcpscan, which Python exports) */
#pragma GCC visibility push(hidden)

typedef int64_t V; /* tag in the low 3 bits, payload above */
enum { T_SPECIAL = 0, T_INT = 1, T_STR = 2, T_NODE = 3 };
#define TAG(v) ((int)((uint64_t)(v)&7u))
#define PAY(v) ((int64_t)(v) >> 3)
#define MK(t, p) ((V)(((uint64_t)(int64_t)(p) << 3) | (uint64_t)(t)))
#define VNONE MK(T_SPECIAL, 0)
#define VFALSE MK(T_SPECIAL, 1)
#define VTRUE MK(T_SPECIAL, 2)
#define VABSENT MK(T_SPECIAL, 3) /* a field not in a state dict: never on the stack */
#define INT_LIMIT ((int64_t)1 << 58)

enum { N_TUPLE = 1, N_LIST, N_DICT, N_GLOBAL, N_OBJ, N_REDUCE };

/* globals we know; anything else: not for us */
enum {
    G_METADATA = 1, G_TSM, G_BSM, G_TPROPS, G_CSM, G_MINDEX, G_SMETA, G_SINFO, /* NEWOBJ classes */
    G_SAVEPLAN, G_WITEM, G_TWDATA, G_BIODATA, /* NEWOBJ: megatron-core's `all_local_plans` (never walked) */
    G_SIZE, G_LAYOUT, G_MEMFMT, G_PATH, G_WITYPE,                          /* REDUCE callables */
    G_DTYPE0 = 32                                                         /* + dtype code */
};

typedef struct {
    uint8_t kind, built;
    uint16_t glob; /* N_GLOBAL: which global; N_OBJ: its class; N_REDUCE: its callable */
    uint32_t len;  /* containers: items held */
    union {
        struct {
            uint32_t start, cap; /* containers: their items in the arena, room reserved */
        } c;
        V v; /* N_OBJ: its state (VNONE until BUILD); N_REDUCE: its args tuple */
    } u;
} Node;

typedef struct {
    uint32_t off, len;
} Str;

typedef struct {
    const unsigned char *d;
    size_t n;
    /* counts are 32-bit: values (int64_t) stored through V pointers cannot alias them, so the
     * compiler keeps them in registers (size_t, unsigned long, may alias long) */
    V *items;
    uint32_t ni, ci;
    Node *nodes;
    uint32_t nn, cn;
    Str *strs; /* byte ranges of `sd`, where every string's bytes are copied (the input is not kept) */
    uint32_t ns, cs;
    unsigned char *sd;
    uint32_t nsd, csd;
    /* scan_fd: the input is read from `fd` as the VM needs it (pread into an anonymous mapping of
     * the file's size, `filled` bytes so far), and the pages behind the VM are given back
     * (MADV_DONTNEED) as it goes: the input never sits whole beside the graph. 0: a buffer in memory */
    int from_fd, fd;
    size_t filled;
    uint32_t *memo; /* memo values, packed (memo_pack): pickle memoizes only strings and objects */
    uint32_t nm, cm;
    V *stack;
    uint32_t nst, cst;
    uint32_t *marks;
    uint32_t nmk, cmk;
    int nomem;
    /* work left: a file may share one object many times (memo references), so that walking it
     * naively costs far more than its size (a hang on a hostile file); every step of the walk
     * is paid from this, sized from the input, and a file that runs out is declined */
    int64_t budget;
} P;

/* every refusal records its source line: `declined_at()` says which check declined the last scan */
extern int dcpscan_fail_line;
#define FAIL (dcpscan_fail_line = __LINE__, -1)
#define BAIL              \
    do {                  \
        dcpscan_fail_line = __LINE__; \
        goto done;        \
    } while (0)

/* arrays in their own mappings (vm.c) */
void *dcpscan_arena_realloc(void *ptr, size_t oldb, size_t newb);
void dcpscan_arena_free(void *ptr, size_t b);
void dcpscan_p_free(P *p); /* every array of a scan given back, *p emptied */
int dcpscan_grow_slow(P *p, void **arr, uint32_t *cap, size_t need, size_t elem);

static inline __attribute__((always_inline)) int grow(P *p, void **arr, uint32_t *cap, size_t need, size_t elem)
{
    return __builtin_expect(need <= *cap, 1) ? 0 : dcpscan_grow_slow(p, arr, cap, need, elem);
}
#define GROW(p, arr, n, cap, add) grow((p), (void **)&(p)->arr, &(p)->cap, (p)->n + (add), sizeof(*(p)->arr))

static inline __attribute__((always_inline)) int push(P *p, V v)
{
    if (GROW(p, stack, nst, cst, 1))
        return FAIL;
    p->stack[p->nst++] = v;
    return 0;
}

static inline __attribute__((always_inline)) uint32_t fence(P *p) { return p->nmk ? p->marks[p->nmk - 1] : 0; }

static inline __attribute__((always_inline)) int pop(P *p, V *v)
{
    if (p->nst <= fence(p))
        return FAIL; /* stack underflow, as the C unpickler says */
    *v = p->stack[--p->nst];
    return 0;
}

static inline __attribute__((always_inline)) int64_t new_node(P *p, int kind)
{
    if (GROW(p, nodes, nn, cn, 1))
        return FAIL;
    Node *nd = &p->nodes[p->nn];
    nd->kind = (uint8_t)kind;
    nd->built = 0;
    nd->glob = 0;
    nd->len = 0;
    nd->u.c.start = 0;
    nd->u.c.cap = 0;
    return (int64_t)p->nn++;
}

/* a node whose items are `k` values (copied from `src`, which may be the stack) */
static inline __attribute__((always_inline)) int64_t new_fixed(P *p, int kind, const V *src, size_t k)
{
    if (k > UINT32_MAX || p->ni + k > UINT32_MAX || GROW(p, items, ni, ci, k))
        return FAIL;
    int64_t id = new_node(p, kind);
    if (id < 0)
        return FAIL;
    for (size_t j = 0; j < k; j++)
        p->items[p->ni + j] = src[j];
    p->nodes[id].u.c.start = (uint32_t)p->ni;
    p->nodes[id].u.c.cap = (uint32_t)k;
    p->nodes[id].len = (uint32_t)k;
    p->ni += k;
    return id;
}

static inline __attribute__((always_inline)) Node *node_of(P *p, V v, int kind)
{
    if (TAG(v) != T_NODE)
        return NULL;
    Node *nd = &p->nodes[PAY(v)];
    return nd->kind == kind ? nd : NULL;
}

static inline __attribute__((always_inline)) const unsigned char *sbytes(P *p, V v, uint32_t *len)
{
    Str s = p->strs[PAY(v)];
    *len = s.len;
    return p->sd + s.off;
}

static inline __attribute__((always_inline)) int str_is_n(P *p, V v, const char *lit, size_t litlen)
{
    if (TAG(v) != T_STR)
        return 0;
    Str s = p->strs[PAY(v)];
    return s.len == litlen && memcmp(p->sd + s.off, lit, litlen) == 0;
}
#define str_is(p, v, lit) str_is_n((p), (v), (lit), strlen(lit))

/* A memo entry in 4 bytes, not 8 (1.3 million of them for 50,000 tensors): the index of a string
 * (low bit 0) or of a node (low bit 1). CPython's pickler memoizes nothing else; a pickle that
 * memoizes another value, or more than 2^31 strings or nodes, is declined (stricter, never looser). */
static inline __attribute__((always_inline)) int memo_pack(V v, uint32_t *out)
{
    int64_t pay = PAY(v);
    if ((TAG(v) != T_STR && TAG(v) != T_NODE) || pay < 0 || pay >= ((int64_t)1 << 31))
        return FAIL;
    *out = ((uint32_t)pay << 1) | (uint32_t)(TAG(v) == T_NODE);
    return 0;
}

static inline __attribute__((always_inline)) V memo_unpack(uint32_t m)
{
    return MK((m & 1u) ? T_NODE : T_STR, (int64_t)(m >> 1));
}

/* A tuple of one value holds it in its node (u.v), not in the arena: 9 such tuples per tensor in
 * a DCP `.metadata` (torch.Size's arguments). Marked by this `glob` (unused by tuples otherwise);
 * every read of a container's items goes through item(). */
#define G_INLINE1 0xFFFFu

static inline __attribute__((always_inline)) int64_t new_tuple1(P *p, V v)
{
    int64_t id = new_node(p, N_TUPLE);
    if (id < 0)
        return FAIL;
    p->nodes[id].glob = (uint16_t)G_INLINE1;
    p->nodes[id].len = 1;
    p->nodes[id].u.v = v;
    return id;
}

static inline __attribute__((always_inline)) V item(P *p, Node *nd, size_t k)
{
    return nd->glob == G_INLINE1 ? nd->u.v : p->items[(size_t)nd->u.c.start + k];
}

/* the dtypes of layouts.ITEMSIZE (vm.c; tests/ckpt/test_dcp_native.py checks they are the same) */
#define DCPSCAN_NDTYPES 27
extern const char *const DCPSCAN_DTYPES[DCPSCAN_NDTYPES];
extern const int DCPSCAN_ITEMSIZES[DCPSCAN_NDTYPES];

typedef struct {
    unsigned char *b;
    size_t n, c;
    int nomem;
} Buf;

typedef struct {
    int64_t file, off, len;
} Span;

typedef struct {
    Buf plan;
    Span *spans;
    uint32_t nsp, csp;
    V *files; /* relative path strings, by file index */
    uint32_t nf, cf;
    int64_t items, nbytes;
    V save_id, ckpt;
    size_t entries_at; /* where the plan's entries begin (its 'E'): first.c reads them */
} Out;

#ifdef DCPSCAN_NO_PYTHON
/* first.c: `compare --first` of a differing pair whose one data file is open as fa / fb */
typedef struct {
    char *name, *detail;   /* the differing tensor; its line as TensorDiff.render() prints it */
    int64_t items, nbytes; /* what Python's early stop counts */
} DcpFirst;
int dcpscan_pread_full(int fd, unsigned char *buf, size_t want, int64_t off); /* front.c: 0, or -1 */
int dcpscan_first(const Buf *plan, size_t entries_at, const char *file, int fa, int fb, int workers, DcpFirst *out);
#endif

int dcpscan_run(P *p, V *out);            /* vm.c: 0 and the root value, or FAIL */
int dcpscan_walk(P *p, V root, Out *o);   /* walk.c: 0 and the plan in o, or FAIL */

#pragma GCC visibility pop
#endif

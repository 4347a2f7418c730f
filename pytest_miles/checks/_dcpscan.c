/* _dcpscan: a reader of torch DCP `.metadata` pickles that calls nothing and builds no Python
 * object per entry; and a GIL-free byte-range comparison.
 *
 * Why: a 20,000-tensor `.metadata` is a 4.4 MB pickle of ~2 million opcodes. CPython's own C
 * unpickler needs ~60 ms for it (its floor: every opcode builds or touches a Python object), and
 * the per-entry Python work after it as much again, on each side. `pytest-miles compare` of two
 * such checkpoints must cost less than hashing their data (issue 14: 5x faster than md5sum).
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
 * Memory safety: every read of the input is bounds-checked before it happens; every array grows
 * through one checked helper; the walk over nested values is depth-limited (cycles included).
 */
#define _GNU_SOURCE /* mremap */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#ifdef __linux__
#include <sys/mman.h>
#endif

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
    G_SIZE, G_LAYOUT, G_MEMFMT, G_PATH,                                   /* REDUCE callables */
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
    Str *strs;
    uint32_t ns, cs;
    V *memo;
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
static int fail_line;
#define FAIL (fail_line = __LINE__, -1)
#define BAIL              \
    do {                  \
        fail_line = __LINE__; \
        goto done;        \
    } while (0)

/* The growing arrays live in their own mappings (Linux): grown by mremap without copying, given
 * back to the system when freed, so that two scans in a row peak at one scan's memory, not two. */
static size_t pages(size_t b) { return (b + 4095) & ~(size_t)4095; }

static void *arena_realloc(void *ptr, size_t oldb, size_t newb)
{
#ifdef __linux__
    void *m = ptr ? mremap(ptr, pages(oldb), pages(newb), MREMAP_MAYMOVE)
                  : mmap(NULL, pages(newb), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return m == MAP_FAILED ? NULL : m;
#else
    (void)oldb;
    return realloc(ptr, newb);
#endif
}

static void arena_free(void *ptr, size_t b)
{
    if (!ptr)
        return;
#ifdef __linux__
    munmap(ptr, pages(b));
#else
    (void)b;
    free(ptr);
#endif
}

static int grow_slow(P *p, void **arr, uint32_t *cap, size_t need, size_t elem)
{
    size_t nc = *cap ? *cap : 64;
    while (nc < need) {
        if (nc > UINT32_MAX / 2) {
            p->nomem = 1;
            return FAIL;
        }
        nc *= 2;
    }
    void *m = arena_realloc(*arr, *cap * elem, nc * elem);
    if (!m) {
        p->nomem = 1;
        return FAIL;
    }
    *arr = m;
    *cap = (uint32_t)nc;
    return 0;
}
static inline __attribute__((always_inline)) int grow(P *p, void **arr, uint32_t *cap, size_t need, size_t elem)
{
    return __builtin_expect(need <= *cap, 1) ? 0 : grow_slow(p, arr, cap, need, elem);
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

/* append k values to a list/dict node: the first batch gets exactly its room, later ones double
 * it (moved to the arena's end, or grown in place when already there) */
static int node_append(P *p, int64_t id, const V *src, size_t k)
{
    Node *nd = &p->nodes[id];
    size_t need = (size_t)nd->len + k;
    if (need > UINT32_MAX)
        return FAIL;
    if (need > nd->u.c.cap) {
        size_t nc = nd->len ? (need > 2 * (size_t)nd->u.c.cap ? need : 2 * (size_t)nd->u.c.cap) : need;
        int at_end = nd->len && (size_t)nd->u.c.start + nd->u.c.cap == p->ni;
        size_t add = at_end ? nc - nd->u.c.cap : nc;
        /* src may point into the stack, never into items: safe across realloc of items */
        if (p->ni + add > UINT32_MAX || GROW(p, items, ni, ci, add))
            return FAIL;
        nd = &p->nodes[id];
        if (!at_end) {
            for (size_t j = 0; j < nd->len; j++)
                p->items[p->ni + j] = p->items[nd->u.c.start + j];
            nd->u.c.start = (uint32_t)p->ni;
        }
        p->ni += add;
        nd->u.c.cap = (uint32_t)nc;
    }
    for (size_t j = 0; j < k; j++)
        p->items[(size_t)nd->u.c.start + nd->len + j] = src[j];
    nd->len = (uint32_t)need;
    return 0;
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
    return p->d + s.off;
}

static inline __attribute__((always_inline)) int str_is_n(P *p, V v, const char *lit, size_t litlen)
{
    if (TAG(v) != T_STR)
        return 0;
    Str s = p->strs[PAY(v)];
    return s.len == litlen && memcmp(p->d + s.off, lit, litlen) == 0;
}
#define str_is(p, v, lit) str_is_n((p), (v), (lit), strlen(lit))

/* the dtypes of layouts.ITEMSIZE, in this order (test_dcpscan checks they are the same) */
static const char *DTYPES[] = {"float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8",
                               "uint8", "uint16", "uint32", "uint64", "bool", "float8_e4m3fn", "float8_e5m2",
                               "float8_e8m0fnu", "complex64", "complex128"};
static const int ITEMSIZES[] = {8, 4, 2, 2, 8, 4, 2, 1, 1, 2, 4, 8, 1, 1, 1, 1, 8, 16};
#define NDTYPES ((int)(sizeof(DTYPES) / sizeof(DTYPES[0])))

static int which_global(P *p, V mod, V name)
{
    static const char *TDCM = "torch.distributed.checkpoint.metadata";
    if (str_is(p, mod, TDCM)) {
        static const char *names[] = {"Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                      "TensorProperties", "ChunkStorageMetadata", "MetadataIndex", "StorageMeta"};
        for (int i = 0; i < 7; i++)
            if (str_is(p, name, names[i]))
                return G_METADATA + i;
        if (str_is(p, name, "_MEM_FORMAT_ENCODING"))
            return G_MEMFMT;
        return 0;
    }
    if (str_is(p, mod, "torch.distributed.checkpoint.filesystem"))
        return str_is(p, name, "_StorageInfo") ? G_SINFO : 0;
    if (str_is(p, mod, "torch.serialization"))
        return str_is(p, name, "_get_layout") ? G_LAYOUT : 0;
    if (str_is(p, mod, "pathlib"))
        return str_is(p, name, "PosixPath") ? G_PATH : 0;
    if (str_is(p, mod, "torch")) {
        if (str_is(p, name, "Size"))
            return G_SIZE;
        for (int i = 0; i < NDTYPES; i++)
            if (str_is(p, name, DTYPES[i]))
                return G_DTYPE0 + i;
    }
    return 0;
}

/* k more bytes at i, inside the input and, where a frame is open, inside that frame: a read that
 * would cross a frame's end is an error in pickle's own (Python) reader, and what CPython's C
 * reader does then is not something we want to second-guess. Well-formed pickles never do it. */
#define NEED(k)                                               \
    do {                                                      \
        if ((size_t)(k) > p->n - i)                           \
            return FAIL;                                      \
        if (frame_end) {                                      \
            if (i >= frame_end)                               \
                frame_end = 0;                                \
            else if ((size_t)(k) > frame_end - i)             \
                return FAIL;                                  \
        }                                                     \
    } while (0)

static uint64_t le(const unsigned char *b, int k)
{
    uint64_t x = 0;
    for (int j = k - 1; j >= 0; j--)
        x = (x << 8) | b[j];
    return x;
}

static int push_str(P *p, size_t off, uint64_t len)
{
    if (len > UINT32_MAX || off > UINT32_MAX)
        return FAIL;
    for (size_t j = 0; j < len; j++)
        if (p->d[off + j] >= 0x80)
            return FAIL; /* non-ASCII: the Python reader decodes it */
    if (GROW(p, strs, ns, cs, 1))
        return FAIL;
    p->strs[p->ns].off = (uint32_t)off;
    p->strs[p->ns].len = (uint32_t)len;
    return push(p, MK(T_STR, p->ns++));
}

static inline __attribute__((always_inline)) int push_int(P *p, int64_t x)
{
    if (x >= INT_LIMIT || x <= -INT_LIMIT)
        return FAIL;
    return push(p, MK(T_INT, x));
}

/* pop the top mark: the stack from it is [*from, nst) */
static int pop_mark(P *p, uint32_t *from)
{
    if (!p->nmk)
        return FAIL;
    *from = p->marks[--p->nmk];
    return 0;
}

/* Would Python's unpickler accept `v` as a dict key? (a list, a dict, TensorProperties - a list
 * subclass - are unhashable: SETITEMS raises). Stricter where unsure: only what DCP uses as keys. */
static int hashable(P *p, V v, int depth)
{
    if (--p->budget < 0)
        return 0;
    if (TAG(v) != T_NODE)
        return 1;
    Node *nd = &p->nodes[PAY(v)];
    switch (nd->kind) {
    case N_GLOBAL:
        return 1;
    case N_OBJ:
        return nd->glob == G_MINDEX; /* DCP's MetadataIndex, hashed by identity */
    case N_TUPLE:
        if (depth > 64)
            return 0;
        for (uint32_t k = 0; k < nd->len; k++)
            if (!hashable(p, p->items[(size_t)nd->u.c.start + k], depth + 1))
                return 0;
        return 1;
    default:
        return 0;
    }
}

static int run(P *p, V *out)
{
    size_t i = 0, frame_end = 0;
    V a, b;
    int64_t id, empty = -1;
    for (;;) {
        NEED(1);
        unsigned char op = p->d[i++];
        switch (op) {
        case 0x80: /* PROTO */
            NEED(1);
            if (p->d[i] < 2 || p->d[i] > 5)
                return FAIL;
            i += 1;
            break;
        case 0x95: { /* FRAME: a new one only where the last one ended; its bytes all there */
            NEED(8);
            uint64_t len = le(p->d + i, 8);
            i += 8;
            if ((frame_end && i < frame_end) || len > p->n - i)
                return FAIL;
            frame_end = i + (size_t)len;
            break;
        }
        case 0x8c: { /* SHORT_BINUNICODE */
            NEED(1);
            size_t len = p->d[i++];
            NEED(len);
            if (push_str(p, i, len))
                return FAIL;
            i += len;
            break;
        }
        case 'X': { /* BINUNICODE */
            NEED(4);
            uint64_t len = le(p->d + i, 4);
            i += 4;
            NEED(len);
            if (push_str(p, i, len))
                return FAIL;
            i += len;
            break;
        }
        case 0x8d: { /* BINUNICODE8 */
            NEED(8);
            uint64_t len = le(p->d + i, 8);
            i += 8;
            NEED(len);
            if (push_str(p, i, len))
                return FAIL;
            i += len;
            break;
        }
        case 'K': /* BININT1 */
            NEED(1);
            if (push_int(p, p->d[i]))
                return FAIL;
            i += 1;
            break;
        case 'M': /* BININT2 */
            NEED(2);
            if (push_int(p, (int64_t)le(p->d + i, 2)))
                return FAIL;
            i += 2;
            break;
        case 'J': /* BININT */
            NEED(4);
            if (push_int(p, (int64_t)(int32_t)(uint32_t)le(p->d + i, 4)))
                return FAIL;
            i += 4;
            break;
        case 0x8a: { /* LONG1: little-endian two's complement, up to 7 bytes here */
            NEED(1);
            size_t len = p->d[i++];
            NEED(len);
            if (len > 7)
                return FAIL;
            int64_t x = 0;
            if (len) {
                uint64_t u = le(p->d + i, (int)len);
                if (p->d[i + len - 1] & 0x80)
                    u |= ~(uint64_t)0 << (8 * len);
                x = (int64_t)u;
            }
            if (push_int(p, x))
                return FAIL;
            i += len;
            break;
        }
        case 'N':
            if (push(p, VNONE))
                return FAIL;
            break;
        case 0x88:
            if (push(p, VTRUE))
                return FAIL;
            break;
        case 0x89:
            if (push(p, VFALSE))
                return FAIL;
            break;
        case ')': /* one empty tuple serves all (immutable) */
            if (empty < 0 && (empty = new_fixed(p, N_TUPLE, NULL, 0)) < 0)
                return FAIL;
            if (push(p, MK(T_NODE, empty)))
                return FAIL;
            break;
        case 0x85: case 0x86: case 0x87: { /* TUPLE1..3 */
            size_t k = (size_t)(op - 0x84);
            if (p->nst < fence(p) + k)
                return FAIL;
            p->nst -= k;
            if ((id = new_fixed(p, N_TUPLE, p->stack + p->nst, k)) < 0 || push(p, MK(T_NODE, id)))
                return FAIL;
            break;
        }
        case 't': { /* TUPLE */
            uint32_t from;
            if (pop_mark(p, &from))
                return FAIL;
            if ((id = new_fixed(p, N_TUPLE, p->stack + from, p->nst - from)) < 0)
                return FAIL;
            p->nst = from;
            if (push(p, MK(T_NODE, id)))
                return FAIL;
            break;
        }
        case ']':
            if ((id = new_node(p, N_LIST)) < 0 || push(p, MK(T_NODE, id)))
                return FAIL;
            break;
        case '}':
            if ((id = new_node(p, N_DICT)) < 0 || push(p, MK(T_NODE, id)))
                return FAIL;
            break;
        case '(':
            if (GROW(p, marks, nmk, cmk, 1))
                return FAIL;
            p->marks[p->nmk++] = p->nst;
            break;
        case 'a': /* APPEND */
            if (pop(p, &a) || p->nst <= fence(p) || !node_of(p, p->stack[p->nst - 1], N_LIST))
                return FAIL;
            if (node_append(p, PAY(p->stack[p->nst - 1]), &a, 1))
                return FAIL;
            break;
        case 's': { /* SETITEM */
            V kv[2];
            if (pop(p, &kv[1]) || pop(p, &kv[0]) || p->nst <= fence(p) || !node_of(p, p->stack[p->nst - 1], N_DICT) ||
                !hashable(p, kv[0], 0))
                return FAIL;
            if (node_append(p, PAY(p->stack[p->nst - 1]), kv, 2))
                return FAIL;
            break;
        }
        case 'e': case 'u': { /* APPENDS, SETITEMS */
            uint32_t from;
            if (pop_mark(p, &from) || from < 1 || from - 1 < fence(p))
                return FAIL;
            size_t k = p->nst - from;
            if (op == 'u' && (k & 1))
                return FAIL;
            if (!node_of(p, p->stack[from - 1], op == 'e' ? N_LIST : N_DICT))
                return FAIL;
            if (op == 'u')
                for (uint32_t j = from; j < p->nst; j += 2)
                    if (!hashable(p, p->stack[j], 0))
                        return FAIL;
            if (k && node_append(p, PAY(p->stack[from - 1]), p->stack + from, k))
                return FAIL;
            p->nst = from;
            break;
        }
        case 0x94: /* MEMOIZE */
            if (p->nst <= fence(p) || GROW(p, memo, nm, cm, 1))
                return FAIL;
            p->memo[p->nm++] = p->stack[p->nst - 1];
            break;
        case 'h': /* BINGET */
            NEED(1);
            if (p->d[i] >= p->nm || push(p, p->memo[p->d[i]]))
                return FAIL;
            i += 1;
            break;
        case 'j': { /* LONG_BINGET */
            NEED(4);
            uint64_t k = le(p->d + i, 4);
            if (k >= p->nm || push(p, p->memo[k]))
                return FAIL;
            i += 4;
            break;
        }
        case 0x93: { /* STACK_GLOBAL */
            if (pop(p, &b) || pop(p, &a) || TAG(a) != T_STR || TAG(b) != T_STR)
                return FAIL;
            int g = which_global(p, a, b);
            if (!g)
                return FAIL;
            if ((id = new_node(p, N_GLOBAL)) < 0)
                return FAIL;
            p->nodes[id].glob = (uint16_t)g;
            if (push(p, MK(T_NODE, id)))
                return FAIL;
            break;
        }
        case 0x81: { /* NEWOBJ cls () */
            if (pop(p, &b) || pop(p, &a))
                return FAIL;
            Node *args = node_of(p, b, N_TUPLE), *cls = node_of(p, a, N_GLOBAL);
            if (!args || args->len || !cls || cls->glob < G_METADATA || cls->glob > G_SINFO)
                return FAIL;
            int g = cls->glob;
            if ((id = new_node(p, N_OBJ)) < 0)
                return FAIL;
            p->nodes[id].glob = (uint16_t)g;
            p->nodes[id].u.v = VNONE;
            if (push(p, MK(T_NODE, id)))
                return FAIL;
            break;
        }
        case 'R': { /* REDUCE callable args */
            if (pop(p, &b) || pop(p, &a))
                return FAIL;
            Node *args = node_of(p, b, N_TUPLE), *fn = node_of(p, a, N_GLOBAL);
            if (!args || !fn || fn->glob < G_SIZE || fn->glob > G_PATH)
                return FAIL;
            /* torch.Size is tuple() there: one tuple argument (the _Ref and Path calls take anything) */
            if (fn->glob == G_SIZE && (args->len != 1 || !node_of(p, p->items[args->u.c.start], N_TUPLE)))
                return FAIL;
            int g = fn->glob;
            if ((id = new_node(p, N_REDUCE)) < 0)
                return FAIL;
            p->nodes[id].glob = (uint16_t)g;
            p->nodes[id].u.v = b;
            if (push(p, MK(T_NODE, id)))
                return FAIL;
            break;
        }
        case 'b': { /* BUILD: once per object */
            if (pop(p, &b) || p->nst <= fence(p))
                return FAIL;
            Node *obj = node_of(p, p->stack[p->nst - 1], N_OBJ);
            if (!obj || obj->built)
                return FAIL;
            /* the state Python's BUILD takes: TensorProperties extends itself by a tuple, the
             * dataclasses take a dict (anything else raises there: not for us either) */
            if (!node_of(p, b, obj->glob == G_TPROPS ? N_TUPLE : N_DICT))
                return FAIL;
            obj->built = 1;
            obj->u.v = b;
            break;
        }
        case '.': /* STOP: one value, no open mark, nothing after */
            if (p->nmk || p->nst != 1 || i != p->n)
                return FAIL;
            *out = p->stack[0];
            return 0;
        default:
            return FAIL;
        }
    }
}

/* ---- the walk ------------------------------------------------------------------------------ */

static inline __attribute__((always_inline)) V item(P *p, Node *nd, size_t k) { return p->items[(size_t)nd->u.c.start + k]; }

static int obj_is(P *p, V v, int glob)
{
    Node *o = node_of(p, v, N_OBJ); /* built or not (BytesStorageMetadata has no state to build) */
    return o && o->glob == glob;
}

/* a field of an object whose state is a dict of str keys: the last value set, or VABSENT */
static int field_n(P *p, V obj, const char *name, size_t nlen, V *out)
{
    Node *o = node_of(p, obj, N_OBJ);
    Node *d = node_of(p, o->u.v, N_DICT);
    if (!d || (p->budget -= d->len) < 0)
        return FAIL;
    *out = VABSENT;
    for (uint32_t k = 0; k < d->len; k += 2) {
        V key = item(p, d, k);
        if (TAG(key) != T_STR)
            return FAIL;
        if (str_is_n(p, key, name, nlen))
            *out = item(p, d, k + 1);
    }
    return 0;
}

#define field(p, obj, lit, out) field_n((p), (obj), (lit), sizeof(lit) - 1, (out))

/* torch.Size((ints,)) -> the node of the int tuple */
static Node *size_tuple(P *p, V v, int allow_negative)
{
    Node *r = node_of(p, v, N_REDUCE);
    if (!r || r->glob != G_SIZE)
        return NULL;
    Node *args = &p->nodes[PAY(r->u.v)];
    if (args->len != 1)
        return NULL;
    Node *t = node_of(p, item(p, args, 0), N_TUPLE);
    if (!t || (p->budget -= t->len) < 0)
        return NULL;
    for (uint32_t k = 0; k < t->len; k++) {
        V x = item(p, t, k);
        if (TAG(x) != T_INT || (!allow_negative && PAY(x) < 0))
            return NULL;
    }
    return t;
}

/* ---- output buffers ------------------------------------------------------------------------ */

typedef struct {
    unsigned char *b;
    size_t n, c;
    int nomem;
} Buf;

static inline __attribute__((always_inline)) int put(Buf *o, const void *src, size_t k)
{
    if (o->n + k > o->c) {
        size_t nc = o->c ? o->c : 4096;
        while (nc < o->n + k) {
            if (nc > SIZE_MAX / 2) {
                o->nomem = 1;
                return FAIL;
            }
            nc *= 2;
        }
        unsigned char *m = arena_realloc(o->b, o->c, nc);
        if (!m) {
            o->nomem = 1;
            return FAIL;
        }
        o->b = m;
        o->c = nc;
    }
    memcpy(o->b + o->n, src, k);
    o->n += k;
    return 0;
}
static int put64(Buf *o, int64_t x) /* zigzag LEB128: most numbers here take a byte or two */
{
    unsigned char b[10];
    uint64_t u = ((uint64_t)x << 1) ^ (uint64_t)(x >> 63);
    int k = 0;
    do {
        b[k++] = (unsigned char)((u & 0x7f) | (u > 0x7f ? 0x80 : 0));
        u >>= 7;
    } while (u);
    return put(o, b, (size_t)k);
}
static int put8(Buf *o, int x)
{
    unsigned char c = (unsigned char)x;
    return put(o, &c, 1);
}
static int putstr(P *p, Buf *o, V s)
{
    uint32_t n;
    const unsigned char *b = sbytes(p, s, &n);
    if ((p->budget -= n) < 0)
        return FAIL;
    return put64(o, n) || put(o, b, n);
}

/* any value, canonically (structure and order): for the fields compared as values */
static int canon(P *p, Buf *o, V v, int depth)
{
    if (depth > 64 || --p->budget < 0)
        return FAIL; /* deep, cyclic or shared past reason: the Python reader decides */
    switch (TAG(v)) {
    case T_SPECIAL:
        return put8(o, 'S') || put64(o, PAY(v));
    case T_INT:
        return put8(o, 'I') || put64(o, PAY(v));
    case T_STR:
        return put8(o, 'U') || putstr(p, o, v);
    case T_NODE: {
        Node *nd = &p->nodes[PAY(v)];
        if (put8(o, 'n') || put8(o, nd->kind) || put8(o, nd->built) || put64(o, nd->glob) || put64(o, nd->len))
            return FAIL;
        if (nd->kind == N_OBJ || nd->kind == N_REDUCE)
            return canon(p, o, nd->u.v, depth + 1);
        if (nd->kind == N_GLOBAL)
            return 0;
        for (uint32_t k = 0; k < nd->len; k++)
            if (canon(p, o, item(p, nd, k), depth + 1))
                return FAIL;
        return 0;
    }
    }
    return FAIL;
}

/* ---- hash tables over (string, int tuple) keys ---------------------------------------------- */

typedef struct {
    V str;       /* key string */
    Node *ints;  /* key ints (a tuple node) or NULL */
    int64_t val; /* payload; -1: empty slot */
} Slot;

typedef struct {
    Slot *s;
    size_t cap;
} Table;

static uint64_t hkey(P *p, V str, Node *ints)
{
    uint32_t n;
    const unsigned char *b = sbytes(p, str, &n);
    uint64_t h = 1469598103934665603ull;
    for (uint32_t k = 0; k < n; k++)
        h = (h ^ b[k]) * 1099511628211ull;
    if (ints)
        for (uint32_t k = 0; k < ints->len; k++)
            h = (h ^ (uint64_t)PAY(item(p, ints, k))) * 1099511628211ull;
    return h ^ (h >> 29);
}

static int same_str(P *p, V x, V y)
{
    uint32_t nx, ny;
    const unsigned char *bx = sbytes(p, x, &nx), *by = sbytes(p, y, &ny);
    return nx == ny && memcmp(bx, by, nx) == 0;
}

static int same_ints(P *p, Node *x, Node *y)
{
    if (!x || !y)
        return !x && !y;
    if (x->len != y->len)
        return 0;
    for (uint32_t k = 0; k < x->len; k++)
        if (item(p, x, k) != item(p, y, k))
            return 0;
    return 1;
}

static int table_init(Table *t, size_t n)
{
    t->cap = 16;
    while (t->cap < 2 * n + 2)
        t->cap *= 2;
    t->s = malloc(t->cap * sizeof(Slot));
    if (!t->s)
        return FAIL;
    for (size_t k = 0; k < t->cap; k++)
        t->s[k].val = -1;
    return 0;
}

/* the slot of a key: found (val >= 0) or where it goes */
static Slot *table_find(P *p, Table *t, V str, Node *ints)
{
    p->budget -= (int64_t)p->strs[PAY(str)].len + (ints ? ints->len : 0); /* the caller checks */
    size_t k = (size_t)hkey(p, str, ints) & (t->cap - 1);
    for (;;) {
        Slot *s = &t->s[k];
        if (s->val < 0 || (same_str(p, s->str, str) && same_ints(p, s->ints, ints)))
            return s;
        k = (k + 1) & (t->cap - 1);
    }
}

/* ---- the plan ------------------------------------------------------------------------------- */

typedef struct {
    V rel;
    int64_t off, len, trans;
} Info;

typedef struct {
    int64_t file, off, len;
} Span;

static int cmp_span(const void *x, const void *y)
{
    const Span *a = x, *b = y;
    if (a->file != b->file)
        return a->file < b->file ? -1 : 1;
    if (a->off != b->off)
        return a->off < b->off ? -1 : 1;
    return (a->len > b->len) - (a->len < b->len);
}

typedef struct {
    Buf plan;
    Span *spans;
    uint32_t nsp, csp;
    V *files; /* relative path strings, by file index */
    uint32_t nf, cf;
    int64_t items, nbytes;
    V save_id, ckpt;
} Out;

static int good_rel(P *p, V rel)
{
    if (TAG(rel) != T_STR)
        return 0;
    uint32_t n;
    const unsigned char *b = sbytes(p, rel, &n);
    if (!n || (n == 1 && b[0] == '.') || (n == 2 && b[0] == '.' && b[1] == '.'))
        return 0;
    for (uint32_t k = 0; k < n; k++)
        if (b[k] < 0x20 || b[k] > 0x7e || b[k] == '/' || b[k] == '\\')
            return 0; /* a top-level file name, printable: anything else is the Python reader's */
    return 1;
}

static int int_field(P *p, V obj, const char *name, int64_t *out)
{
    V v;
    if (field_n(p, obj, name, strlen(name), &v) || TAG(v) != T_INT || PAY(v) < 0)
        return FAIL;
    *out = PAY(v);
    return 0;
}

static int mul_ok(int64_t a, int64_t b, int64_t *out)
{
    if (a && b > INT64_MAX / a)
        return 0;
    *out = a * b;
    return 1;
}

static int walk(P *p, V root, Out *o)
{
    V sdm_v, sto_v, planner, version, smeta;
    if (!obj_is(p, root, G_METADATA) || field(p, root, "state_dict_metadata", &sdm_v) ||
        field(p, root, "storage_data", &sto_v) || field(p, root, "planner_data", &planner) ||
        field(p, root, "version", &version) || field(p, root, "storage_meta", &smeta))
        return FAIL;
    Node *sdm = node_of(p, sdm_v, N_DICT), *sto = node_of(p, sto_v, N_DICT);
    if (!sdm || !sto)
        return FAIL;
    Buf *b = &o->plan;
    if (put(b, "DCPPLAN1", 8))
        return FAIL;
    /* compared as values: planner_data, version, storage_meta but its ids */
    if (put8(b, 'P') || canon(p, b, planner == VABSENT ? VNONE : planner, 0) || put8(b, 'V') ||
        canon(p, b, version == VABSENT ? VNONE : version, 0))
        return FAIL;
    o->save_id = o->ckpt = VNONE;
    if (smeta != VABSENT && smeta != VNONE) {
        if (!obj_is(p, smeta, G_SMETA))
            return FAIL;
        Node *d = node_of(p, node_of(p, smeta, N_OBJ)->u.v, N_DICT);
        if (!d)
            return FAIL;
        if (put8(b, 'M'))
            return FAIL;
        for (uint32_t k = 0; k < d->len; k += 2) {
            V key = item(p, d, k), val = item(p, d, k + 1);
            if (TAG(key) != T_STR)
                return FAIL;
            if (str_is(p, key, "save_id")) {
                if (TAG(val) != T_STR && val != VNONE)
                    return FAIL;
                o->save_id = val;
            } else if (str_is(p, key, "checkpoint_id")) {
                if (TAG(val) != T_STR && val != VNONE) {
                    Node *r = node_of(p, val, N_REDUCE);
                    if (!r || r->glob != G_PATH)
                        return FAIL;
                    Node *parts = &p->nodes[PAY(r->u.v)];
                    for (uint32_t j = 0; j < parts->len; j++)
                        if (TAG(item(p, parts, j)) != T_STR)
                            return FAIL;
                }
                o->ckpt = val;
            } else if (canon(p, b, key, 0) || canon(p, b, val, 0)) {
                return FAIL;
            }
        }
    }

    /* storage: (fqn, chunk offsets) -> where */
    Table st = {0}, ft = {0}, seen = {0};
    Info *infos = NULL;
    int rc = -1;
    size_t nsto = sto->len / 2;
    if (table_init(&st, nsto) || !(infos = malloc((nsto ? nsto : 1) * sizeof(Info))) || table_init(&ft, 16))
        BAIL;
    for (size_t k = 0; k < nsto; k++) {
        V key = item(p, sto, 2 * k), val = item(p, sto, 2 * k + 1), fqn, off;
        if (p->budget < 0)
            BAIL;
        if (!obj_is(p, key, G_MINDEX) || !obj_is(p, val, G_SINFO) || field(p, key, "fqn", &fqn) ||
            field(p, key, "offset", &off) || TAG(fqn) != T_STR)
            BAIL;
        Node *offs = NULL;
        if (off != VNONE && off != VABSENT) { /* DCP leaves out an offset of None, as getattr's default */
            if (!(offs = size_tuple(p, off, 1)))
                BAIL;
            if (!offs->len)
                offs = NULL; /* an empty Size is () as None is */
        }
        Info *in = &infos[k];
        V trans;
        if (field(p, val, "relative_path", &in->rel) || !good_rel(p, in->rel) || int_field(p, val, "offset", &in->off) ||
            int_field(p, val, "length", &in->len) || field(p, val, "transform_descriptors", &trans))
            BAIL;
        if (trans == VABSENT || trans == VNONE)
            in->trans = 0;
        else if (node_of(p, trans, N_LIST) || node_of(p, trans, N_TUPLE))
            in->trans = p->nodes[PAY(trans)].len > 0;
        else
            BAIL;
        if (in->off > INT64_MAX - in->len)
            BAIL;
        Slot *s = table_find(p, &st, fqn, offs);
        if (s->val >= 0)
            BAIL; /* two storage entries for one chunk: the Python reader keeps the last */
        s->str = fqn;
        s->ints = offs;
        s->val = (int64_t)k;
    }

    /* entries, in order */
    size_t nent = sdm->len / 2;
    if (table_init(&seen, nent))
        BAIL;
    if (put8(b, 'E') || put64(b, (int64_t)nent))
        BAIL;
    for (size_t k = 0; k < nent; k++) {
        V fqn = item(p, sdm, 2 * k), md = item(p, sdm, 2 * k + 1);
        if (p->budget < 0)
            BAIL;
        if (TAG(fqn) != T_STR)
            BAIL;
        Slot *s = table_find(p, &seen, fqn, NULL);
        if (s->val >= 0)
            BAIL; /* a key twice: the Python reader keeps the last */
        s->str = fqn;
        s->ints = NULL;
        s->val = (int64_t)k;
        if (putstr(p, b, fqn))
            BAIL;
        Node *shape = NULL, *chunks = NULL;
        int dt = -1;
        if (obj_is(p, md, G_BSM)) {
            if (put8(b, 'B'))
                BAIL;
        } else if (obj_is(p, md, G_TSM)) {
            V props, size, chs;
            if (field(p, md, "properties", &props) || field(p, md, "size", &size) || field(p, md, "chunks", &chs))
                BAIL;
            if (!obj_is(p, props, G_TPROPS))
                BAIL;
            Node *pt = node_of(p, node_of(p, props, N_OBJ)->u.v, N_TUPLE);
            if (!pt || !pt->len)
                BAIL;
            Node *g = node_of(p, item(p, pt, 0), N_GLOBAL);
            if (!g || g->glob < G_DTYPE0)
                BAIL;
            dt = g->glob - G_DTYPE0;
            if (!(shape = size_tuple(p, size, 0)) || !(chunks = node_of(p, chs, N_LIST)))
                BAIL;
            if (put8(b, 'T') || put8(b, dt) || put64(b, shape->len))
                BAIL;
            for (uint32_t j = 0; j < shape->len; j++)
                if (put64(b, PAY(item(p, shape, j))))
                    BAIL;
        } else {
            BAIL;
        }
        uint32_t nch = chunks ? chunks->len : 1;
        int64_t numel = 1, covered = 0;
        if (shape)
            for (uint32_t j = 0; j < shape->len; j++)
                if (!mul_ok(numel, PAY(item(p, shape, j)), &numel))
                    BAIL;
        if (put64(b, nch))
            BAIL;
        for (uint32_t c = 0; c < nch; c++) {
            Node *offs = NULL, *sizes = NULL;
            if (p->budget < 0)
                BAIL;
            int64_t cnum = 1;
            if (chunks) {
                V ch = item(p, chunks, c), ov, sv;
                if (!obj_is(p, ch, G_CSM) || field(p, ch, "offsets", &ov) || field(p, ch, "sizes", &sv))
                    BAIL;
                if (!(offs = size_tuple(p, ov, 0)) || !(sizes = size_tuple(p, sv, 0)))
                    BAIL;
                if (offs->len != shape->len || sizes->len != shape->len)
                    BAIL;
                for (uint32_t j = 0; j < shape->len; j++) {
                    int64_t o_ = PAY(item(p, offs, j)), c_ = PAY(item(p, sizes, j)), s_ = PAY(item(p, shape, j));
                    if (o_ > s_ - c_)
                        BAIL; /* outside its tensor */
                    if (!mul_ok(cnum, c_, &cnum))
                        BAIL;
                }
                if (covered > INT64_MAX - cnum)
                    BAIL;
                covered += cnum;
                for (uint32_t j = 0; j < shape->len; j++)
                    if (put64(b, PAY(item(p, offs, j))) || put64(b, PAY(item(p, sizes, j))))
                        BAIL;
            }
            Slot *s = table_find(p, &st, fqn, offs && offs->len ? offs : NULL);
            if (s->val < 0)
                BAIL; /* no storage entry for this chunk */
            Info *in = &infos[s->val];
            int64_t isz;
            int raw = dt >= 0 && !in->trans && mul_ok(cnum, ITEMSIZES[dt], &isz) && in->len == isz;
            Slot *f = table_find(p, &ft, in->rel, NULL);
            if (f->val < 0) {
                if (grow(p, (void **)&o->files, &o->cf, o->nf + 1, sizeof(V)))
                    BAIL;
                f->str = in->rel;
                f->ints = NULL;
                f->val = (int64_t)o->nf;
                o->files[o->nf++] = in->rel;
                if (o->nf * 2 + 2 > ft.cap) { /* keep the table at most half full */
                    Table bigger;
                    if (table_init(&bigger, o->nf * 2))
                        BAIL;
                    for (size_t q = 0; q < o->nf; q++) {
                        Slot *t = table_find(p, &bigger, o->files[q], NULL);
                        t->str = o->files[q];
                        t->ints = NULL;
                        t->val = (int64_t)q;
                    }
                    free(ft.s);
                    ft = bigger;
                }
                f = table_find(p, &ft, in->rel, NULL);
            }
            if (grow(p, (void **)&o->spans, &o->csp, o->nsp + 1, sizeof(Span)))
                BAIL;
            o->spans[o->nsp].file = f->val;
            o->spans[o->nsp].off = in->off;
            o->spans[o->nsp].len = in->len;
            o->nsp++;
            o->items++;
            if (o->nbytes > INT64_MAX - in->len)
                BAIL;
            o->nbytes += in->len;
            if (putstr(p, b, in->rel) || put64(b, in->off) || put64(b, in->len) || put8(b, raw ? 'r' : (in->trans ? 't' : 's')))
                BAIL;
        }
        if (chunks && covered != numel)
            BAIL; /* the chunks do not hold the tensor */
    }
    if (p->budget < 0)
        BAIL;
    /* per file: no two items share bytes */
    qsort(o->spans, o->nsp, sizeof(Span), cmp_span);
    {
        int64_t file = -1, end = 0;
        for (size_t k = 0; k < o->nsp; k++) {
            Span *sp = &o->spans[k];
            if (sp->file != file)
                file = sp->file, end = 0;
            if (sp->len && sp->off < end)
                BAIL;
            if (sp->len && sp->off + sp->len > end)
                end = sp->off + sp->len;
        }
    }
    rc = b->nomem ? FAIL : 0;
done:
    free(seen.s);
    free(st.s);
    free(ft.s);
    free(infos);
    if (b->nomem)
        p->nomem = 1;
    return rc;
}

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
 * mapping costs a page fault per 4 KiB, ~40% of a scan) until release() gives them back. Taken
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
    arena_free(o->plan.b, o->plan.c);
    arena_free(o->spans, o->csp * sizeof(Span));
    arena_free(o->files, o->cf * sizeof(V));
}

static void p_free(P *p);

static void put_cache(P *p, Out *o)
{
    if (cache.full) {
        p_free(p);
        out_free(o);
        return;
    }
    memset(&cache, 0, sizeof(cache));
    cache.p.items = p->items, cache.p.ci = p->ci;
    cache.p.nodes = p->nodes, cache.p.cn = p->cn;
    cache.p.strs = p->strs, cache.p.cs = p->cs;
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
        p_free(&cache.p);
        out_free(&cache.o);
        cache.full = 0;
    }
    Py_RETURN_NONE;
}

static void p_free(P *p)
{
    arena_free(p->items, p->ci * sizeof(V));
    arena_free(p->nodes, p->cn * sizeof(Node));
    arena_free(p->strs, p->cs * sizeof(Str));
    arena_free(p->memo, p->cm * sizeof(V));
    arena_free(p->stack, p->cst * sizeof(V));
    arena_free(p->marks, p->cmk * sizeof(uint32_t));
}

static PyObject *build_result(P *p, Out *o)
{
    /* files: [(name, how far into it the items reach)] */
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
    if (!(plan = PyBytes_FromStringAndSize((const char *)o->plan.b, (Py_ssize_t)o->plan.n)))
        goto out;
    if (!(sid = id_of(p, o->save_id)) || !(cid = id_of(p, o->ckpt)))
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

static PyObject *scan(PyObject *self, PyObject *arg)
{
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    P p = {0};
    Out o = {0};
    V root;
    PyObject *res = NULL;
    take_cache(&p, &o);
    fail_line = 0;
    p.budget = 16 * (int64_t)view.len + (1 << 20);
    p.d = view.buf;
    p.n = (size_t)view.len;
    int ok;
    Py_BEGIN_ALLOW_THREADS /* C data only until build_result: two sides scan on two cores */
    ok = p.n <= UINT32_MAX && run(&p, &root) == 0;
    ok = ok && walk(&p, root, &o) == 0;
    Py_END_ALLOW_THREADS
    if (p.nomem || o.plan.nomem)
        PyErr_NoMemory();
    else if (!ok) {
        Py_INCREF(Py_None);
        res = Py_None;
    } else
        res = build_result(&p, &o);
    put_cache(&p, &o);
    PyBuffer_Release(&view);
    return res;
}

PyDoc_STRVAR(cmp_doc, "cmp_range(fd_a, fd_b, offset, length) -> int\n\n"
                      "-1 when bytes [offset, offset + length) of both files are equal, else the offset "
                      "(from `offset`) of the first 1 MiB block that differs; -2 when a file is shorter "
                      "than that (it shrank). Reads with pread, the GIL released.");

static PyObject *cmp_range(PyObject *self, PyObject *args)
{
    int fa, fb;
    long long off, len;
    if (!PyArg_ParseTuple(args, "iiLL", &fa, &fb, &off, &len))
        return NULL;
    if (off < 0 || len < 0) {
        PyErr_SetString(PyExc_ValueError, "negative offset or length");
        return NULL;
    }
    const size_t BLOCK = 1 << 20;
    unsigned char *ba = malloc(BLOCK), *bb = malloc(BLOCK);
    if (!ba || !bb) {
        free(ba);
        free(bb);
        return PyErr_NoMemory();
    }
    long long result = -1, done = 0;
    int err = 0;
    Py_BEGIN_ALLOW_THREADS
    while (done < len) {
        size_t want = (size_t)(len - done < (long long)BLOCK ? len - done : (long long)BLOCK);
        unsigned char *bufs[2] = {ba, bb};
        int fds[2] = {fa, fb};
        for (int s = 0; s < 2 && !err; s++) {
            size_t got = 0;
            while (got < want) {
                ssize_t r = pread(fds[s], bufs[s] + got, want - got, (off_t)(off + done + (long long)got));
                if (r < 0 && errno == EINTR)
                    continue;
                if (r < 0) {
                    err = errno;
                    break;
                }
                if (r == 0) {
                    result = -2;
                    break;
                }
                got += (size_t)r;
            }
            if (result == -2)
                break;
        }
        if (err || result == -2)
            break;
        if (memcmp(ba, bb, want) != 0) {
            result = done;
            break;
        }
        done += (long long)want;
    }
    Py_END_ALLOW_THREADS
    free(ba);
    free(bb);
    if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromLongLong(result);
}

static PyObject *declined_at(PyObject *self, PyObject *unused) { return PyLong_FromLong(fail_line); }

static PyObject *dtypes(PyObject *self, PyObject *unused)
{
    PyObject *d = PyDict_New();
    if (!d)
        return NULL;
    for (int i = 0; i < NDTYPES; i++) {
        PyObject *v = PyLong_FromLong(ITEMSIZES[i]);
        if (!v || PyDict_SetItemString(d, DTYPES[i], v)) {
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
    {"cmp_range", cmp_range, METH_VARARGS, cmp_doc},
    {"dtypes", dtypes, METH_NOARGS, "{dtype name: item size} this reader knows"},
    {"declined_at", declined_at, METH_NOARGS, "the source line of the check that declined the last scan (0: none)"},
    {"release", release, METH_NOARGS, "give back the memory kept from the last scan for the next one"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_dcpscan",
                                    "Native reader of torch DCP .metadata (see the source's header).", -1, methods};

PyMODINIT_FUNC PyInit__dcpscan(void) { return PyModule_Create(&module); }

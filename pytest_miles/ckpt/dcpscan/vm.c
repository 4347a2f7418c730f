/* vm.c: the pickle VM of the native DCP reader (see dcpscan.h, module.c). */
#include "dcpscan.h"

/* The growing arrays live in their own mappings (Linux): grown by mremap without copying, given
 * back to the system when freed, so that two scans in a row peak at one scan's memory, not two. */
static size_t pages(size_t b) { return (b + 4095) & ~(size_t)4095; }

void *dcpscan_arena_realloc(void *ptr, size_t oldb, size_t newb)
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

void dcpscan_arena_free(void *ptr, size_t b)
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

/* Every array of a scan given back, and the scan emptied (module.c and front.c share it). */
void dcpscan_p_free(P *p)
{
    dcpscan_arena_free(p->items, p->ci * sizeof(V));
    dcpscan_arena_free(p->nodes, p->cn * sizeof(Node));
    dcpscan_arena_free(p->strs, p->cs * sizeof(Str));
    dcpscan_arena_free(p->sd, p->csd);
    dcpscan_arena_free(p->memo, p->cm * sizeof(*p->memo));
    dcpscan_arena_free(p->stack, p->cst * sizeof(V));
    dcpscan_arena_free(p->marks, p->cmk * sizeof(uint32_t));
    memset(p, 0, sizeof(*p));
}

int dcpscan_grow_slow(P *p, void **arr, uint32_t *cap, size_t need, size_t elem)
{
    size_t nc = *cap ? *cap : 64;
    while (nc < need) {
        if (nc > UINT32_MAX / 2) {
            p->nomem = 1;
            return FAIL;
        }
        nc *= 2;
    }
    void *m = dcpscan_arena_realloc(*arr, *cap * elem, nc * elem);
    if (!m) {
        p->nomem = 1;
        return FAIL;
    }
    *arr = m;
    *cap = (uint32_t)nc;
    return 0;
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

/* the dtypes of layouts.ITEMSIZE, in this order (tests/ckpt/test_dcp_native.py checks they are the same) */
const char *const DCPSCAN_DTYPES[DCPSCAN_NDTYPES] = {
    "float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8",
    "uint16", "uint32", "uint64", "bool", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
    "float8_e5m2fnuz", "float8_e8m0fnu", "float4_e2m1fn_x2", "complex32", "complex64",
    "complex128", "bits8", "bits16", "bits1x8", "bits2x4", "bits4x2"};
const int DCPSCAN_ITEMSIZES[DCPSCAN_NDTYPES] = {8, 4, 2, 2, 8, 4, 2, 1, 1, 2, 4, 8, 1, 1, 1, 1, 1, 1, 1, 4, 8, 16, 1, 2, 1, 1, 1};

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
    /* megatron-core's planner keeps the save plans in Metadata.all_local_plans: data classes and an
     * enum (WriteItemType(n): a REDUCE), accepted as values, never walked (nor compared, as in the
     * Python reader) */
    if (str_is(p, mod, "torch.distributed.checkpoint.planner")) {
        static const char *names[] = {"SavePlan", "WriteItem", "TensorWriteData", "BytesIOWriteData"};
        for (int i = 0; i < 4; i++)
            if (str_is(p, name, names[i]))
                return G_SAVEPLAN + i;
        return str_is(p, name, "WriteItemType") ? G_WITYPE : 0;
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
        for (int i = 0; i < DCPSCAN_NDTYPES; i++)
            if (str_is(p, name, DCPSCAN_DTYPES[i]))
                return G_DTYPE0 + i;
    }
    return 0;
}

#define WINDOW ((size_t)1 << 18) /* scan_fd reads 256 KiB at a time and gives back what lies 256 KiB behind */

/* scan_fd: read the input on to `upto` (at least WINDOW more, at most the size); a read error or a
 * file that shrank declines the scan (the Python reader, reading it again, names the problem) */
static int fill(P *p, size_t upto)
{
    size_t want = p->filled + WINDOW;
    if (want < upto)
        want = upto;
    if (want > p->n)
        want = p->n;
    unsigned char *buf = (unsigned char *)(uintptr_t)p->d;
    while (p->filled < want) {
        ssize_t r = pread(p->fd, buf + p->filled, want - p->filled, (off_t)p->filled);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return FAIL;
        p->filled += (size_t)r;
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
        if (p->from_fd && i + (size_t)(k) > p->filled && fill(p, i + (size_t)(k))) \
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
    if (GROW(p, strs, ns, cs, 1) || (uint64_t)p->nsd + len > UINT32_MAX || GROW(p, sd, nsd, csd, len + 1))
        return FAIL;
    if (len) /* (room for one more byte above: the arena exists even for empty strings, never NULL) */
        memcpy(p->sd + p->nsd, p->d + off, (size_t)len);
    p->strs[p->ns].off = p->nsd;
    p->strs[p->ns].len = (uint32_t)len;
    p->nsd += (uint32_t)len;
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
            if (!hashable(p, item(p, nd, k), depth + 1))
                return 0;
        return 1;
    default:
        return 0;
    }
}

/* an object (NEWOBJ: its state VNONE until BUILD) or a call (REDUCE: its args) of global g, pushed */
static int push_call(P *p, int kind, int g, V v)
{
    int64_t id = new_node(p, kind);
    if (id < 0)
        return FAIL;
    p->nodes[id].glob = (uint16_t)g;
    p->nodes[id].u.v = v;
    return push(p, MK(T_NODE, id));
}

int dcpscan_run(P *p, V *out)
{
    size_t i = 0, frame_end = 0;
    V a, b;
    int64_t id, empty = -1;
    size_t dropped = 0; /* from_fd: input pages below this were given back */
    for (;;) {
#ifdef __linux__
        if (p->from_fd && i - dropped >= WINDOW) { /* never read again: strings are copied */
            size_t upto = i & ~(size_t)4095;
            madvise((void *)(uintptr_t)(p->d + dropped), upto - dropped, MADV_DONTNEED);
            dropped = upto;
        }
#endif
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
        case 0x8c: case 'X': case 0x8d: { /* SHORT_BINUNICODE, BINUNICODE, BINUNICODE8: 1, 4, 8-byte lengths */
            int w = op == 0x8c ? 1 : op == 'X' ? 4 : 8;
            NEED(w);
            uint64_t len = le(p->d + i, w);
            i += (size_t)w;
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
            id = k == 1 ? new_tuple1(p, p->stack[p->nst]) : new_fixed(p, N_TUPLE, p->stack + p->nst, k);
            if (id < 0 || push(p, MK(T_NODE, id)))
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
            if (p->nst <= fence(p) || GROW(p, memo, nm, cm, 1) || memo_pack(p->stack[p->nst - 1], &p->memo[p->nm]))
                return FAIL;
            p->nm++;
            break;
        case 'h': /* BINGET */
            NEED(1);
            if (p->d[i] >= p->nm || push(p, memo_unpack(p->memo[p->d[i]])))
                return FAIL;
            i += 1;
            break;
        case 'j': { /* LONG_BINGET */
            NEED(4);
            uint64_t k = le(p->d + i, 4);
            if (k >= p->nm || push(p, memo_unpack(p->memo[k])))
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
            if (!args || args->len || !cls || cls->glob < G_METADATA || cls->glob > G_BIODATA)
                return FAIL;
            if (push_call(p, N_OBJ, cls->glob, VNONE))
                return FAIL;
            break;
        }
        case 'R': { /* REDUCE callable args */
            if (pop(p, &b) || pop(p, &a))
                return FAIL;
            Node *args = node_of(p, b, N_TUPLE), *fn = node_of(p, a, N_GLOBAL);
            if (!args || !fn || fn->glob < G_SIZE || fn->glob > G_WITYPE)
                return FAIL;
            /* torch.Size is tuple() there: one tuple argument (the _Ref and Path calls take anything) */
            if (fn->glob == G_SIZE && (args->len != 1 || !node_of(p, item(p, args, 0), N_TUPLE)))
                return FAIL;
            if (push_call(p, N_REDUCE, fn->glob, b))
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


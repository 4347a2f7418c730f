/* walk.c: the value graph walked as DCP's Metadata (see dcpscan.h, module.c). */
#include "dcpscan.h"

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
        unsigned char *m = dcpscan_arena_realloc(o->b, o->c, nc);
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
        if (put8(o, 'n') || put8(o, nd->kind) || put8(o, nd->built) ||
            put64(o, nd->kind == N_TUPLE ? 0 : nd->glob) || put64(o, nd->len)) /* G_INLINE1 is how, not what */
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
    V str;         /* key string */
    uint32_t ints; /* key ints: a tuple node's index + 1, or 0 (none) */
    int32_t val;   /* payload; -1: empty slot (16 bytes a slot: 2 tables of 2^17 slots at 50,000 tensors) */
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
    if (n > INT32_MAX / 4)
        return FAIL; /* payloads are int32 (no real `.metadata` comes near) */
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
        if (s->val < 0 || (same_str(p, s->str, str) && same_ints(p, s->ints ? &p->nodes[s->ints - 1] : NULL, ints)))
            return s;
        k = (k + 1) & (t->cap - 1);
    }
}

/* ---- the plan ------------------------------------------------------------------------------- */

typedef struct {
    V rel;
    int64_t off, len, trans;
} Info;

static int cmp_span(const void *x, const void *y)
{
    const Span *a = x, *b = y;
    if (a->file != b->file)
        return a->file < b->file ? -1 : 1;
    if (a->off != b->off)
        return a->off < b->off ? -1 : 1;
    return (a->len > b->len) - (a->len < b->len);
}

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

int dcpscan_walk(P *p, V root, Out *o)
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
        s->ints = offs ? (uint32_t)(offs - p->nodes) + 1 : 0;
        s->val = (int32_t)k;
    }

    /* entries, in order */
    size_t nent = sdm->len / 2;
    if (table_init(&seen, nent))
        BAIL;
    o->entries_at = b->n;
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
        s->ints = 0;
        s->val = (int32_t)k;
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
            int raw = dt >= 0 && !in->trans && mul_ok(cnum, DCPSCAN_ITEMSIZES[dt], &isz) && in->len == isz;
            Slot *f = table_find(p, &ft, in->rel, NULL);
            if (f->val < 0) {
                if (grow(p, (void **)&o->files, &o->cf, o->nf + 1, sizeof(V)))
                    BAIL;
                f->str = in->rel;
                f->ints = 0;
                f->val = (int32_t)o->nf;
                o->files[o->nf++] = in->rel;
                if (o->nf * 2 + 2 > ft.cap) { /* keep the table at most half full */
                    Table bigger;
                    if (table_init(&bigger, o->nf * 2))
                        BAIL;
                    for (size_t q = 0; q < o->nf; q++) {
                        Slot *t = table_find(p, &bigger, o->files[q], NULL);
                        t->str = o->files[q];
                        t->ints = 0;
                        t->val = (int32_t)q;
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


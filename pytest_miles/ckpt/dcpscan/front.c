/* front.c: the `pytest-miles` command. `pytest-miles compare A B` of two EQUAL plain DCP checkpoints
 * (and `--first` of a differing pair: first.c) is answered here, without starting Python; every
 * other command line is handed over (exec) to the Python command line, `pytest-miles-py` beside
 * this executable, with the same arguments.
 *
 * Why: on a machine of two cores, the Python interpreter's start (~30 ms with a venv's site) and
 * the imports of the fast path (~14 ms) are most of what `compare` of 20,000 small tensors costs
 * beyond reading their bytes (`cat`: ~50 ms); a command that starts Python cannot come within 1.3x
 * of `cat` there (docs/validation/checkpoints.md, 2026-12-04).
 *
 * What it answers: what checks/dcp_fast.py answers, with the report and exit code the Python
 * command prints for it: two plain DCP dirs (`.metadata`, `*.distcp`, json/txt/yaml files beside
 * them) whose `.metadata` the native reader vouches for, with equal plans (the second side's
 * `.metadata` may be the first's but for its save ids, as in dcp_mirror.py), byte-identical data
 * and side files. It is stricter than that path, never looser: a Megatron run dir, torch files
 * beside, any flag but --first and --workers N, PYTEST_MILES_NATIVE / PYTEST_MILES_CONFIG /
 * PYTHONIOENCODING set, a path that is not ASCII, and every pair that is not EQUAL (or that this
 * code cannot read) go to Python, which decides from scratch. One exception: `--first` on such a
 * pair whose plans are equal and whose one data file differs is answered by first.c where it is sure
 * to print Python's report (DIFFERENT, the first differing element); it never reports an error of its
 * own: those reports are Python's.
 *
 * Safety, as the module's (module.c): files are opened O_NONBLOCK (a FIFO never blocks) and used
 * only when fstat says they are regular; every read is bounded by the size fixed at open; nothing
 * is written, nothing from the files is executed; the `.metadata` goes through the same pickle VM
 * and walk (vm.c, walk.c) as in the Python module.
 */
/* built with -DDCPSCAN_NO_PYTHON (setup.py), as vm.c and walk.c are for it */
#include "dcpscan.h"
#include <dirent.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <sys/stat.h>
#include <time.h>

int dcpscan_fail_line;

#define PY_CLI "pytest-miles-py" /* the Python command line, installed beside this executable */
#define PIECE ((int64_t)32 << 20) /* data files are compared in pieces of this size (dcp_fast.PIECE) */
#define BLOCK ((size_t)1 << 18)   /* read blocks: page-aligned, 256 KiB (module.c) */
#define TRACKER "latest_checkpointed_iteration.txt"
#define IDS_IGNORED ".metadata: save_id and checkpoint_id are ignored (random per save / path-dependent)"

static char **g_argv;
/* The bytes or the plans of the pair differ: Python's own fast path (dcp_fast.py) cannot answer
 * either, so the Python command line is told to go straight to the full comparison (it would only
 * read the same bytes again first; the verdict never depends on it: that path only answers EQUAL). */
#define FAST_DECLINED "_PYTEST_MILES_FAST_DECLINED"
static int g_fast_declined;

/* ---- handing over to Python --------------------------------------------------------------- */

static void hand_over(void) __attribute__((noreturn));
static void hand_over(void)
{
    char self[PATH_MAX], cli[PATH_MAX + sizeof(PY_CLI) + 1];
    ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
    if (n > 0)
        self[n] = 0;
    else if (strchr(g_argv[0], '/') && strlen(g_argv[0]) < sizeof(self))
        strcpy(self, g_argv[0]);
    else
        self[0] = 0;
    char *slash = strrchr(self, '/');
    if (g_fast_declined)
        setenv(FAST_DECLINED, "1", 1);
    if (slash) {
        slash[1] = 0;
        snprintf(cli, sizeof(cli), "%s%s", self, PY_CLI);
        g_argv[0] = cli;
        execv(cli, g_argv);
    } else
        snprintf(cli, sizeof(cli), "%s", PY_CLI);
    fprintf(stderr, "pytest-miles: cannot start the Python command line %s (%s); reinstall pytest-miles\n", cli,
            strerror(errno));
    exit(2);
}

/* ---- files ---------------------------------------------------------------------------------- */

typedef struct {
    int fd;
    int64_t size;
} F;

static int open_regular(const char *path, F *f)
{
    f->fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (f->fd < 0)
        return -1;
    struct stat st;
    if (fstat(f->fd, &st) || !S_ISREG(st.st_mode)) {
        close(f->fd);
        f->fd = -1;
        return -1;
    }
    f->size = (int64_t)st.st_size;
    return 0;
}

int dcpscan_pread_full(int fd, unsigned char *buf, size_t want, int64_t off)
{
    size_t got = 0;
    while (got < want) {
        ssize_t r = pread(fd, buf + got, want - got, (off_t)(off + (int64_t)got));
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return -1; /* an error, or the file shrank */
        got += (size_t)r;
    }
    return 0;
}

/* 1: bytes [oa, oa + len) of A equal [ob, ob + len) of B; 0: they differ, or a read failed */
static int same_range(int fa, int64_t oa, int fb, int64_t ob, int64_t len, unsigned char *ba, unsigned char *bb,
                      const volatile int *stop)
{
    for (int64_t done = 0; done < len; done += (int64_t)BLOCK) {
        size_t want = len - done < (int64_t)BLOCK ? (size_t)(len - done) : BLOCK;
        if ((stop && *stop) || dcpscan_pread_full(fa, ba, want, oa + done) ||
            dcpscan_pread_full(fb, bb, want, ob + done) ||
            memcmp(ba, bb, want) != 0)
            return 0;
    }
    return 1;
}

typedef struct {
    unsigned char *a, *b;
} Bufs;

static int bufs_new(Bufs *x)
{
    x->a = x->b = NULL;
    if (posix_memalign((void **)&x->a, 4096, BLOCK) || posix_memalign((void **)&x->b, 4096, BLOCK)) {
        free(x->a);
        return -1;
    }
    return 0;
}

static void bufs_free(Bufs *x)
{
    free(x->a);
    free(x->b);
}

/* ---- one side: a plain DCP dir ---------------------------------------------------------------- */

typedef struct {
    char root[PATH_MAX];
    char **distcp, **beside;
    size_t nd, nb;
} Side;

static int ends_with(const char *s, const char *suffix)
{
    size_t n = strlen(s), k = strlen(suffix);
    return n >= k && memcmp(s + n - k, suffix, k) == 0;
}

static int by_name(const void *x, const void *y) { return strcmp(*(char *const *)x, *(char *const *)y); }

static int add_name(char ***arr, size_t *n, const char *name)
{
    char **m = realloc(*arr, (*n + 1) * sizeof(char *));
    if (!m)
        return -1;
    *arr = m;
    if (!(m[*n] = strdup(name)))
        return -1;
    (*n)++;
    return 0;
}

/* dcp_fast._dcp_dir, for plain DCP dirs only (a Megatron run dir, torch files beside: Python's) */
static int side_of(const char *path, Side *s)
{
    memset(s, 0, sizeof(*s));
    struct stat st;
    char sub[PATH_MAX * 2];
    if (!realpath(path, s->root) || stat(s->root, &st) || !S_ISDIR(st.st_mode))
        return -1;
    snprintf(sub, sizeof(sub), "%s/%s", s->root, TRACKER);
    if (lstat(sub, &st) == 0 || errno != ENOENT)
        return -1;
    DIR *d = opendir(s->root);
    if (!d)
        return -1;
    int meta = 0, bad = 0;
    struct dirent *e;
    while (!bad && (errno = 0, e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
            continue;
        snprintf(sub, sizeof(sub), "%s/%s", s->root, e->d_name);
        if (stat(sub, &st) || !S_ISREG(st.st_mode))
            bad = 1; /* a dir, FIFO, socket, device, dangling link */
        else if (!strcmp(e->d_name, ".metadata"))
            meta = 1;
        else if (ends_with(e->d_name, ".distcp"))
            bad = add_name(&s->distcp, &s->nd, e->d_name);
        else if (ends_with(e->d_name, ".json") || ends_with(e->d_name, ".txt") || ends_with(e->d_name, ".yaml") ||
                 ends_with(e->d_name, ".yml"))
            bad = add_name(&s->beside, &s->nb, e->d_name);
        else
            bad = 1; /* torch files (Python reads them for the counts), anything else */
    }
    if (errno)
        bad = 1;
    closedir(d);
    if (bad || !meta)
        return -1;
    if (s->nd)
        qsort(s->distcp, s->nd, sizeof(char *), by_name);
    if (s->nb)
        qsort(s->beside, s->nb, sizeof(char *), by_name);
    return 0;
}

static int same_names(char **x, size_t nx, char **y, size_t ny)
{
    if (nx != ny)
        return 0;
    for (size_t k = 0; k < nx; k++)
        if (strcmp(x[k], y[k]))
            return 0;
    return 1;
}

/* ---- the scan of a `.metadata` (module.c: scan_fd, build_result) ---------------------------- */

typedef struct {
    Out o;          /* the plan, spans and file table (the graph is given back) */
    char **files;   /* the data files the items lie in, and how far into each they reach */
    int64_t *ends;
    uint32_t nf;
    char *save_id, *ckpt; /* dcp_fast._ids: NULL where absent or empty */
} Scan;

static char *str_copy(P *p, V v)
{
    uint32_t n;
    const unsigned char *b = sbytes(p, v, &n);
    char *s = malloc((size_t)n + 1);
    if (s) {
        memcpy(s, b, n);
        s[n] = 0;
    }
    return s;
}

/* os.path.join of a PosixPath's parts (the VM's strings are ASCII) */
static char *path_join(char **parts, size_t n)
{
    size_t total = 1;
    for (size_t j = 0; j < n; j++)
        total += strlen(parts[j]) + 1;
    char *out = malloc(total);
    if (!out)
        return NULL;
    out[0] = 0;
    for (size_t j = 0; j < n; j++) {
        size_t len = strlen(out);
        if (parts[j][0] == '/')
            strcpy(out, parts[j]);
        else if (len == 0 || out[len - 1] == '/')
            strcat(out, parts[j]);
        else {
            strcat(out, "/");
            strcat(out, parts[j]);
        }
    }
    return out;
}

static char *id_copy(P *p, V v)
{
    char *s = NULL;
    if (v == VNONE)
        return NULL;
    if (TAG(v) == T_STR)
        s = str_copy(p, v);
    else {
        Node *parts = &p->nodes[PAY(node_of(p, v, N_REDUCE)->u.v)];
        char **each = calloc(parts->len ? parts->len : 1, sizeof(char *));
        if (!each)
            return NULL;
        int ok = 1;
        for (uint32_t j = 0; j < parts->len; j++)
            ok = ok && (each[j] = str_copy(p, item(p, parts, j)));
        if (ok)
            s = path_join(each, parts->len);
        for (uint32_t j = 0; j < parts->len; j++)
            free(each[j]);
        free(each);
    }
    if (s && !s[0]) { /* an empty id is no id (dcp_fast._ids) */
        free(s);
        s = NULL;
    }
    return s;
}

static void drop_vm_arrays(P *p)
{
    dcpscan_arena_free(p->memo, p->cm * sizeof(*p->memo));
    dcpscan_arena_free(p->stack, p->cst * sizeof(V));
    dcpscan_arena_free(p->marks, p->cmk * sizeof(uint32_t));
    p->memo = NULL, p->stack = NULL, p->marks = NULL;
    p->nm = p->cm = p->nst = p->cst = p->nmk = p->cmk = 0;
}

/* 0 and the scan, or -1: not a `.metadata` the native reader vouches for (or no memory) */
static int scan_file(const char *path, Scan *s)
{
    memset(s, 0, sizeof(*s));
    F f;
    if (open_regular(path, &f))
        return -1;
    if ((uint64_t)f.size > UINT32_MAX) {
        close(f.fd);
        return -1;
    }
    size_t n = (size_t)f.size;
    unsigned char *buf = dcpscan_arena_realloc(NULL, 0, n ? n : 1);
    P p = {0};
    V root;
    int ok = buf != NULL;
    if (ok) {
        p.budget = 16 * (int64_t)n + (1 << 20);
        p.d = buf, p.n = n, p.from_fd = 1, p.fd = f.fd;
        ok = dcpscan_run(&p, &root) == 0;
        if (ok)
            drop_vm_arrays(&p);
        ok = ok && dcpscan_walk(&p, root, &s->o) == 0 && !p.nomem && !s->o.plan.nomem;
    }
    if (ok) {
        s->nf = s->o.nf;
        s->files = calloc(s->nf ? s->nf : 1, sizeof(char *));
        s->ends = calloc(s->nf ? s->nf : 1, sizeof(int64_t));
        ok = s->files && s->ends;
        for (uint32_t k = 0; ok && k < s->nf; k++)
            ok = (s->files[k] = str_copy(&p, s->o.files[k])) != NULL;
        for (uint32_t k = 0; ok && k < s->o.nsp; k++) {
            Span *sp = &s->o.spans[k];
            if (sp->off + sp->len > s->ends[sp->file])
                s->ends[sp->file] = sp->off + sp->len;
        }
        if (ok) {
            s->save_id = id_copy(&p, s->o.save_id);
            s->ckpt = id_copy(&p, s->o.ckpt);
        }
    }
    dcpscan_p_free(&p);
    if (buf)
        dcpscan_arena_free(buf, n ? n : 1);
    close(f.fd);
    return ok ? 0 : -1;
}

/* ---- dcp_mirror.mirrored_ids_files: is B's `.metadata` A's but for its save ids? ----------- */

static const unsigned char TAIL_KEY[] = "\x8c\x0cstorage_meta\x94";
#define TAIL_KEYLEN (sizeof(TAIL_KEY) - 1)
#define TAIL_MAX 65536

/* One opcode of a pickle's tail as pickletools.genops reads it: its length (opcode and argument),
 * where its argument lies, and whether it is a string (SHORT_BINUNICODE, BINUNICODE, BINUNICODE8).
 * 0: an opcode this check does not read (text opcodes, extensions) or one cut short. */
static size_t op_at(const unsigned char *t, size_t n, size_t i, size_t *aoff, size_t *alen, int *is_str)
{
    static const char *noarg = "(.012}abe]oRstu)dlNQ";
    unsigned char c = t[i];
    size_t fixed = 0, lenbytes = 0;
    *is_str = 0;
    if (c && strchr(noarg, c))
        fixed = 0;
    else if (c == 0x81 || (c >= 0x85 && c <= 0x89) || (c >= 0x8f && c <= 0x94) || c == 0x97 || c == 0x98)
        fixed = 0;
    else if (c == 'K' || c == 'h' || c == 'q' || c == 0x80)
        fixed = 1;
    else if (c == 'M')
        fixed = 2;
    else if (c == 'J' || c == 'j' || c == 'r')
        fixed = 4;
    else if (c == 'G' || c == 0x95)
        fixed = 8;
    else if (c == 0x8a || c == 'U' || c == 0x8c || c == 'C')
        lenbytes = 1;
    else if (c == 'T' || c == 'X' || c == 'B')
        lenbytes = 4;
    else if (c == 0x8d || c == 0x8e || c == 0x96)
        lenbytes = 8;
    else
        return 0;
    *is_str = c == 0x8c || c == 'X' || c == 0x8d;
    if (!lenbytes) {
        if (fixed > n - i - 1)
            return 0;
        *aoff = i + 1, *alen = fixed;
        return 1 + fixed;
    }
    if (lenbytes > n - i - 1)
        return 0;
    uint64_t len = 0;
    for (size_t j = lenbytes; j > 0; j--)
        len = (len << 8) | t[i + j];
    if (len > n - i - 1 - lenbytes)
        return 0;
    *aoff = i + 1 + lenbytes, *alen = (size_t)len;
    return 1 + lenbytes + (size_t)len;
}

static int is_ascii(const unsigned char *b, size_t n)
{
    for (size_t j = 0; j < n; j++)
        if (b[j] >= 0x80)
            return 0;
    return 1;
}

static int bytes_is(const unsigned char *b, size_t n, const char *s) { return n == strlen(s) && !memcmp(b, s, n); }

static char *bytes_dup(const unsigned char *b, size_t n)
{
    char *s = malloc(n + 1);
    if (s) {
        memcpy(s, b, n);
        s[n] = 0;
    }
    return s;
}

enum { MIRROR_NO = 0, MIRROR_YES = 1, MIRROR_PYTHON = 2 };

/* dcp_mirror._tail_ids over the two tails, same rules; B's ids into *sid, *cid (A's where B's
 * equal them). MIRROR_NO where it would return None (or where this reading is stricter: B's
 * differing strings not ASCII, bytes after STOP that differ), MIRROR_PYTHON where Python's would
 * raise (a PosixPath of no parts). */
static int tail_ids(const unsigned char *ta, const unsigned char *tb, size_t n, const Scan *a, char **sid, char **cid)
{
    const char *save_id = a->save_id, *ckpt = a->ckpt;
    char *parts_a[256], *parts_b[256];
    size_t np = 0;
    int in_path = 0, path_seen = 0, res = MIRROR_NO, stopped = 0;
    const unsigned char *last[2] = {NULL, NULL};
    size_t lastn[2] = {0, 0};
    char *out_sid = NULL, *out_cid = NULL;
    size_t ia = 0, ib = 0; /* the tails line up opcode by opcode, not byte by byte (ids of other lengths) */
    while (ia < n && ib < n) {
        size_t ao, al, bo, bl;
        int sa, sb;
        size_t ka = op_at(ta, n, ia, &ao, &al, &sa), kb = op_at(tb, n, ib, &bo, &bl, &sb);
        if (!ka || !kb || ta[ia] != tb[ib])
            goto done;
        unsigned char op = ta[ia];
        int same = ka == kb && !memcmp(ta + ia, tb + ib, ka);
        ia += ka, ib += kb;
        if (op == '.') {
            stopped = 1;
            break;
        }
        if (op == 0x93 && lastn[0] && bytes_is(last[0], lastn[0], "pathlib") && bytes_is(last[1], lastn[1], "PosixPath") &&
            ckpt && !(in_path || path_seen)) {
            in_path = 1;
            continue;
        }
        if (sa && !in_path) {
            last[0] = last[1], lastn[0] = lastn[1];
            last[1] = ta + ao, lastn[1] = al;
        }
        if (in_path && op == 'R') {
            in_path = 0, path_seen = 1;
            if (!np) {
                res = MIRROR_PYTHON; /* os.path.join() of nothing raises */
                goto done;
            }
            char *ja = path_join(parts_a, np), *jb = path_join(parts_b, np);
            int ok = ja && jb && !strcmp(ja, ckpt);
            free(ja);
            free(out_cid);
            out_cid = ok ? jb : NULL;
            if (!ok) {
                free(jb);
                goto done;
            }
            continue;
        }
        if (in_path && sa) {
            if (np == 256 || !is_ascii(tb + bo, bl) || !(parts_a[np] = bytes_dup(ta + ao, al)))
                goto done;
            if (!(parts_b[np] = bytes_dup(tb + bo, bl))) {
                free(parts_a[np]);
                goto done;
            }
            np++;
            continue;
        }
        if (same)
            continue;
        if (!sa || !is_ascii(tb + bo, bl))
            goto done;
        if (save_id && bytes_is(ta + ao, al, save_id) && bl == al && !out_sid) {
            if (!(out_sid = bytes_dup(tb + bo, bl)))
                goto done;
        } else if (ckpt && bytes_is(ta + ao, al, ckpt) && !path_seen && !out_cid) {
            if (!(out_cid = bytes_dup(tb + bo, bl)))
                goto done;
        } else
            goto done;
    }
    if (stopped && ia == ib && !memcmp(ta + ia, tb + ib, n - ia)) /* (what follows STOP: the same bytes) */
        res = MIRROR_YES;
done:
    for (size_t j = 0; j < np; j++) {
        free(parts_a[j]);
        free(parts_b[j]);
    }
    if (res == MIRROR_YES) {
        /* {k: out.get(k, v) for k, v in ids_a.items()}: an id B lacks is A's */
        *sid = out_sid ? out_sid : (save_id ? strdup(save_id) : NULL);
        *cid = out_cid ? out_cid : (ckpt ? strdup(ckpt) : NULL);
        if ((save_id && !*sid) || (ckpt && !*cid))
            return MIRROR_PYTHON;
        /* an id found in B's tail that is empty is still B's id there (Python keeps "" too) */
    } else {
        free(out_sid);
        free(out_cid);
    }
    return res;
}

/* mirrored_ids_files: A searched for the key (exactly once), the prefixes compared, the tails read */
static int mirrored(const F *fa, const F *fb, const Scan *a, char **sid, char **cid, Bufs *bufs)
{
    if (fa->size != fb->size)
        return MIRROR_NO;
    int64_t size = fa->size, start = -1, found = 0;
    size_t piece = (size_t)1 << 20, keep = TAIL_KEYLEN - 1;
    unsigned char *buf = malloc(piece + keep);
    if (!buf)
        return MIRROR_NO;
    for (int64_t at = 0; at < size && found <= 1; at += (int64_t)piece) {
        size_t want = size - at < (int64_t)(piece + keep) ? (size_t)(size - at) : piece + keep;
        if (dcpscan_pread_full(fa->fd, buf, want, at)) {
            found = 2;
            break;
        }
        for (const unsigned char *q = buf; (q = memmem(q, want - (size_t)(q - buf), TAIL_KEY, TAIL_KEYLEN));
             q += TAIL_KEYLEN) {
            if (!found)
                start = at + (q - buf);
            found++;
        }
    }
    free(buf);
    if (found != 1 || size - start > TAIL_MAX)
        return MIRROR_NO;
    size_t n = (size_t)(size - start);
    unsigned char *ta = malloc(n), *tb = malloc(n);
    int res = MIRROR_NO;
    if (ta && tb && !dcpscan_pread_full(fa->fd, ta, n, start) && !dcpscan_pread_full(fb->fd, tb, n, start) &&
        !memcmp(tb, TAIL_KEY, TAIL_KEYLEN) && same_range(fa->fd, 0, fb->fd, 0, start, bufs->a, bufs->b, NULL))
        res = tail_ids(ta, tb, n, a, sid, cid);
    free(ta);
    free(tb);
    return res;
}

/* ---- the data files, compared whole by this thread and one more (dcp_fast._WholeFiles) ------- */

typedef struct {
    int fa, fb;
    int64_t off, len;
} Piece;

typedef struct {
    Piece *pieces;
    size_t n;
    size_t next; /* taken with __atomic_fetch_add */
    volatile int stop, differ;
} Work;

static void *work(void *arg)
{
    Work *w = arg;
    Bufs b;
    if (bufs_new(&b)) {
        w->differ = 1, w->stop = 1;
        return NULL;
    }
    while (!w->stop) {
        size_t i = __atomic_fetch_add(&w->next, 1, __ATOMIC_RELAXED);
        if (i >= w->n)
            break;
        Piece *p = &w->pieces[i];
        if (!same_range(p->fa, p->off, p->fb, p->off, p->len, b.a, b.b, &w->stop)) {
            w->differ = 1;
            w->stop = 1;
        }
    }
    bufs_free(&b);
    return NULL;
}

/* ---- the report (compare_report.Report.render of the fast path's report) ------------------- */

typedef struct {
    char *b;
    size_t n, c;
    int nomem;
} Text;

static void add(Text *t, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void add(Text *t, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int k = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (k < 0 || t->nomem)
        return;
    if (t->n + (size_t)k + 1 > t->c) {
        size_t c = (t->n + (size_t)k + 1) * 2;
        char *m = realloc(t->b, c);
        if (!m) {
            t->nomem = 1;
            return;
        }
        t->b = m, t->c = c;
    }
    va_start(ap, fmt);
    vsnprintf(t->b + t->n, (size_t)k + 1, fmt, ap);
    va_end(ap);
    t->n += (size_t)k;
}

/* dcp_mirror.id_notes: the second note ("" where no ids) */
static void ids_note(Text *t, const char *sid, const char *cid)
{
    if (sid || cid)
        add(t, ".metadata: %s%s%s%s%s", sid ? "save_id=" : "", sid ? sid : "", sid && cid ? "; " : "",
            cid ? "checkpoint_id=" : "", cid ? cid : "");
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Python prints these arguments as they are only where they are ASCII (no decoding question) */
static int plain_arg(const char *s)
{
    return *s && *s != '-' && is_ascii((const unsigned char *)s, strlen(s));
}

static int positive(const char *s, int *out)
{
    if (!*s || *s == '0' || strlen(s) > 9)
        return 0;
    for (const char *q = s; *q; q++)
        if (*q < '0' || *q > '9')
            return 0;
    *out = atoi(s);
    return 1;
}

static int write_all(const char *b, size_t n)
{
    while (n) {
        ssize_t r = write(1, b, n);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return -1;
        b += r, n -= (size_t)r;
    }
    return 0;
}

/* The exit code of an answered `compare`, or -1: hand over to Python. */
static int compare(int argc, char **argv, double t0)
{
    const char *a = NULL, *b = NULL;
    int workers = 0, first = 0;
    for (int k = 2; k < argc; k++) {
        if (!strcmp(argv[k], "--first")) {
            first = 1; /* an EQUAL pair's report is the same with it; a differing pair: first.c */
            continue;
        }
        if (!strcmp(argv[k], "--workers") && k + 1 < argc && positive(argv[k + 1], &workers)) {
            k++;
            continue;
        }
        if (!strncmp(argv[k], "--workers=", 10) && positive(argv[k] + 10, &workers))
            continue;
        if (!plain_arg(argv[k]) || b)
            return -1;
        if (a)
            b = argv[k];
        else
            a = argv[k];
    }
    if (!b)
        return -1;
    if (!workers) {
        long cpus = sysconf(_SC_NPROCESSORS_ONLN);
        workers = cpus >= 2 ? 2 : 1;
    }
    Side sa, sb;
    if (side_of(a, &sa) || side_of(b, &sb) || !same_names(sa.distcp, sa.nd, sb.distcp, sb.nd) ||
        !same_names(sa.beside, sa.nb, sb.beside, sb.nb))
        return -1;
    char path[PATH_MAX * 2];
    size_t np = 0;
    F *fa = calloc(sa.nd ? sa.nd : 1, sizeof(F)), *fb = calloc(sa.nd ? sa.nd : 1, sizeof(F));
    if (!fa || !fb)
        return -1;
    for (size_t k = 0; k < sa.nd; k++) {
        snprintf(path, sizeof(path), "%s/%s", sa.root, sa.distcp[k]);
        if (open_regular(path, &fa[k]))
            return -1;
        snprintf(path, sizeof(path), "%s/%s", sb.root, sb.distcp[k]);
        if (open_regular(path, &fb[k]) || fa[k].size != fb[k].size)
            return -1;
        np += (size_t)((fa[k].size + PIECE - 1) / PIECE);
    }
    Work w = {0};
    w.pieces = calloc(np ? np : 1, sizeof(Piece));
    if (!w.pieces)
        return -1;
    for (size_t k = 0; k < sa.nd; k++)
        for (int64_t off = 0; off < fa[k].size; off += PIECE)
            w.pieces[w.n++] = (Piece){fa[k].fd, fb[k].fd, off, fa[k].size - off < PIECE ? fa[k].size - off : PIECE};
    pthread_t helper;
    int started = workers > 1 && pthread_create(&helper, NULL, work, &w) == 0;

    /* meanwhile: A's `.metadata`, then B's (its ids only, when it mirrors A's) */
    int answer = -1;
    Scan scan_a, scan_b;
    char *sid_b = NULL, *cid_b = NULL;
    Bufs bufs;
    F ma = {-1, 0}, mb = {-1, 0};
    DcpFirst diff = {0};
    if (bufs_new(&bufs))
        goto out;
    snprintf(path, sizeof(path), "%s/.metadata", sa.root);
    if (scan_file(path, &scan_a) || open_regular(path, &ma))
        goto out;
    snprintf(path, sizeof(path), "%s/.metadata", sb.root);
    if (open_regular(path, &mb))
        goto out;
    int m = mirrored(&ma, &mb, &scan_a, &sid_b, &cid_b, &bufs);
    if (m == MIRROR_PYTHON)
        goto out;
    if (m == MIRROR_NO) {
        if (scan_file(path, &scan_b))
            goto out;
        if (scan_b.o.plan.n != scan_a.o.plan.n || memcmp(scan_b.o.plan.b, scan_a.o.plan.b, scan_a.o.plan.n)) {
            g_fast_declined = 1;
            goto out;
        }
        sid_b = scan_b.save_id, cid_b = scan_b.ckpt;
    }
    /* items; the data files the plan names are the dir's, each long enough for its items */
    if (!scan_a.o.items || scan_a.nf != sa.nd)
        goto out;
    for (uint32_t k = 0; k < scan_a.nf; k++) { /* by name, each with how far its items reach */
        uint32_t j = 0;
        while (j < sa.nd && strcmp(scan_a.files[k], sa.distcp[j]))
            j++;
        if (j == sa.nd || fa[j].size < scan_a.ends[k])
            goto out;
    }
    qsort(scan_a.files, scan_a.nf, sizeof(char *), by_name);
    for (uint32_t k = 0; k < scan_a.nf; k++) /* every data file of the dir named once */
        if (strcmp(scan_a.files[k], sa.distcp[k]))
            goto out;
    /* side files: byte-identical (json/txt/yaml: no items of their own) */
    for (size_t k = 0; k < sa.nb; k++) {
        F x, y;
        snprintf(path, sizeof(path), "%s/%s", sa.root, sa.beside[k]);
        if (open_regular(path, &x))
            goto out;
        snprintf(path, sizeof(path), "%s/%s", sb.root, sb.beside[k]);
        if (open_regular(path, &y)) {
            close(x.fd);
            goto out;
        }
        int same = x.size == y.size && same_range(x.fd, 0, y.fd, 0, x.size, bufs.a, bufs.b, NULL);
        close(x.fd);
        close(y.fd);
        if (!same)
            goto out;
    }
    answer = 0;
out:
    if (answer == 0) {
        work(&w); /* this thread takes pieces too */
        if (started)
            pthread_join(helper, NULL);
        started = 0;
        if (w.differ)
            answer = -1, g_fast_declined = 1;
        /* --first of a pair of one data file: its first difference named here where first.c is sure */
        if (w.differ && first && sa.nd == 1 &&
            dcpscan_first(&scan_a.o.plan, scan_a.o.entries_at, sa.distcp[0], fa[0].fd, fb[0].fd, workers, &diff) == 0)
            answer = 1;
    }
    if (started) {
        w.stop = 1;
        pthread_join(helper, NULL);
    }
    if (answer < 0)
        return -1; /* the descriptors are O_CLOEXEC: exec closes them */

    /* the report, as Report.render prints the fast path's (EQUAL) or the full path's (--first) */
    double secs = now() - t0;
    int64_t items = answer ? diff.items : scan_a.o.items, nbytes = answer ? diff.nbytes : 2 * scan_a.o.nbytes;
    Text t = {0}, na = {0}, nb = {0};
    ids_note(&na, scan_a.save_id, scan_a.ckpt);
    ids_note(&nb, sid_b, cid_b);
    add(&t, "checkpoints %s\n  A: %s [dcp]\n  B: %s [dcp]\n", answer ? "DIFFERENT (1 difference(s))" : "EQUAL", a, b);
    add(&t, "  compared %lld items, %.1f MiB in %.2f s (%.2f GB/s)\n", (long long)items, (double)nbytes / 1048576.0,
        secs, secs ? (double)nbytes / secs / 1e9 : 0.0);
    if (answer)
        add(&t, "  first difference in checkpoint order: %s\n  - [tensor] %s\n  (stopped at the first difference: "
                "--first)\n", diff.name, diff.detail);
    add(&t, "  note: %s\n", IDS_IGNORED); /* both sides carry it */
    /* merge_notes: one line for a note both carry, "A: " / "B: " for a note of one side */
    if (na.n && nb.n && !strcmp(na.b, nb.b))
        add(&t, "  note: %s\n", na.b);
    else {
        if (na.n)
            add(&t, "  note: A: %s\n", na.b);
        if (nb.n)
            add(&t, "  note: B: %s\n", nb.b);
    }
    if (t.nomem || na.nomem || nb.nomem)
        return -1;
    signal(SIGPIPE, SIG_IGN);
    if (write_all(t.b, t.n))
        return errno == EPIPE ? 141 : 2; /* `| head`: the reader left (cli._user_errors: 141) */
    return answer; /* 1: DIFFERENT */
}

int main(int argc, char **argv)
{
    double t0 = now();
    g_argv = argv;
    const char *off[] = {"PYTEST_MILES_NATIVE", "PYTEST_MILES_CONFIG", "PYTHONIOENCODING"};
    int ours = argc >= 4 && !strcmp(argv[1], "compare");
    for (size_t k = 0; ours && k < sizeof(off) / sizeof(*off); k++)
        ours = !(getenv(off[k]) && *getenv(off[k]));
    if (ours) {
        int rc = compare(argc, argv, t0);
        if (rc >= 0)
            return rc;
    }
    hand_over();
}

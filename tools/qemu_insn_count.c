/* A qemu TCG plugin counting the guest instructions executed, per translated block.
 *
 * At exit it writes one line per block that ran, "vaddr n_insns executions" (hex, decimal, decimal), to
 * the file given as the plugin argument out=PATH. The benchmark sums the blocks inside a library's
 * executable mapping (read from /proc/self/maps of the guest) to count what that library executed.
 *
 * Written against qemu's stable plugin API (version 1, qemu 7.2 as Debian 12 ships it); the few
 * declarations it needs are below, as qemu-plugin.h states them, since Debian ships no plugin header.
 * Build: gcc -O2 -shared -fPIC -fvisibility=hidden -o qemu_insn_count.so qemu_insn_count.c
 */
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define QEMU_PLUGIN_EXPORT __attribute__((visibility("default")))

typedef uint64_t qemu_plugin_id_t;
typedef struct qemu_info_t qemu_info_t; /* not read here */
struct qemu_plugin_tb;
enum qemu_plugin_op { QEMU_PLUGIN_INLINE_ADD_U64 };
typedef void (*qemu_plugin_vcpu_tb_trans_cb_t)(qemu_plugin_id_t id, struct qemu_plugin_tb *tb);
typedef void (*qemu_plugin_udata_cb_t)(qemu_plugin_id_t id, void *userdata);

void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t id, qemu_plugin_vcpu_tb_trans_cb_t cb);
void qemu_plugin_register_vcpu_tb_exec_inline(struct qemu_plugin_tb *tb, enum qemu_plugin_op op, void *ptr,
                                              uint64_t imm);
size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *tb);
uint64_t qemu_plugin_tb_vaddr(const struct qemu_plugin_tb *tb);
void qemu_plugin_register_atexit_cb(qemu_plugin_id_t id, qemu_plugin_udata_cb_t cb, void *userdata);

QEMU_PLUGIN_EXPORT int qemu_plugin_version = 1;

struct block {
    uint64_t vaddr;
    uint64_t n_insns;
    uint64_t executions; /* incremented inline by the translated code */
};

/* Blocks are allocated in chunks that never move: the translated code holds pointers into them. */
enum { CHUNK = 1 << 16 };
static struct block **chunks;
static size_t n_blocks, n_chunks;
static char out_path[4096];

static struct block *new_block(void) {
    if (n_blocks == n_chunks * CHUNK) {
        chunks = realloc(chunks, ++n_chunks * sizeof *chunks);
        chunks[n_chunks - 1] = calloc(CHUNK, sizeof(struct block));
        if (!chunks || !chunks[n_chunks - 1]) abort();
    }
    struct block *b = &chunks[n_blocks / CHUNK][n_blocks % CHUNK];
    n_blocks++;
    return b;
}

/* A block translated twice (after a flush) gets two records; the reader adds them up. */
static void on_translate(qemu_plugin_id_t id, struct qemu_plugin_tb *tb) {
    struct block *b = new_block();
    b->vaddr = qemu_plugin_tb_vaddr(tb);
    b->n_insns = qemu_plugin_tb_n_insns(tb);
    qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &b->executions, 1);
}

static void write_counts(qemu_plugin_id_t id, void *userdata) {
    FILE *out = fopen(out_path, "w");
    if (!out) return;
    for (size_t i = 0; i < n_blocks; i++) {
        struct block *b = &chunks[i / CHUNK][i % CHUNK];
        if (b->executions) fprintf(out, "%llx %llu %llu\n", (unsigned long long)b->vaddr,
                                   (unsigned long long)b->n_insns, (unsigned long long)b->executions);
    }
    fclose(out);
}

QEMU_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc, char **argv) {
    for (int i = 0; i < argc; i++)
        if (strncmp(argv[i], "out=", 4) == 0) snprintf(out_path, sizeof out_path, "%s", argv[i] + 4);
    if (!out_path[0]) {
        fprintf(stderr, "qemu_insn_count: give the output file as out=PATH\n");
        return -1;
    }
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_translate);
    qemu_plugin_register_atexit_cb(id, write_counts, NULL);
    return 0;
}

/*
 * vu_client: minimal vfio-user client for latency/throughput benchmarks.
 *
 *   vu_client SOCKET --seconds S [--region 7] [--offset 0] [--count 4] [--warmup N]
 *             [--pipeline N] [--no-info] [--json]
 *
 * Connects, does the VERSION exchange the way QEMU 11.1's client does (0.0, msg_id 0),
 * sends DEVICE_GET_INFO (unless --no-info), then issues REGION_READ commands back to
 * back (--pipeline N outstanding, default 1) for S seconds after N warm-up round trips.
 * Every reply is validated; any mismatch aborts with a message on stderr (exit 1).
 * Each message goes out with one send(); replies are read with a buffered recv loop.
 *
 * Output: {roundTrips, seconds, roundTripsPerSec, usPerRoundTrip, p50Us, p99Us, ...}
 * (JSON with --json). Latencies come from a log2-linear histogram (32 sub-buckets per
 * power of two, ~3% resolution), fixed-size and allocation-free.
 */
#define _GNU_SOURCE
#include "vu_common.h"

#include <stdarg.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

/* The capabilities QEMU 11.1's vfio-user-pci client announces (minus its legacy
 * "migration" object). */
static const char VERSION_JSON[] =
    "{\"capabilities\":{\"max_msg_fds\":16,\"max_data_xfer_size\":1048576,"
    "\"pgsizes\":4096,\"max_dma_maps\":65535,\"write_multiple\":true}}";

#define MAX_PIPELINE 4096u

static void die(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));
static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("vu_client: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(1);
}

static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* ---- log2-linear latency histogram (nanoseconds) ---- */
#define H_SUB_BITS 5
#define H_SUB (1u << H_SUB_BITS)
#define H_BUCKETS ((64 - H_SUB_BITS + 1) * H_SUB)

static uint64_t hist[H_BUCKETS];
static uint64_t hist_n, hist_min = UINT64_MAX, hist_max, hist_sum;

static inline void hist_add(uint64_t v)
{
    unsigned idx;
    if (v < H_SUB) {
        idx = (unsigned)v;
    } else {
        unsigned e = 63u - (unsigned)__builtin_clzll(v); /* e >= H_SUB_BITS */
        idx = (e - H_SUB_BITS + 1) * H_SUB + (unsigned)((v >> (e - H_SUB_BITS)) & (H_SUB - 1));
    }
    hist[idx]++;
    hist_n++;
    hist_sum += v;
    if (v < hist_min) hist_min = v;
    if (v > hist_max) hist_max = v;
}

/* Midpoint of the bucket holding the q-quantile, in ns. */
static double hist_quantile(double q)
{
    if (hist_n == 0) return 0;
    uint64_t rank = (uint64_t)(q * (double)hist_n);
    if (rank >= hist_n) rank = hist_n - 1;
    uint64_t seen = 0;
    for (unsigned i = 0; i < H_BUCKETS; i++) {
        seen += hist[i];
        if (seen > rank) {
            if (i < H_SUB) return i;
            unsigned e = i / H_SUB + H_SUB_BITS - 1, sub = i % H_SUB;
            double lo = (double)((uint64_t)(H_SUB + sub) << (e - H_SUB_BITS));
            double width = (double)(1ull << (e - H_SUB_BITS));
            double mid = lo + width / 2;
            /* never report outside the observed range */
            if (mid < (double)hist_min) mid = (double)hist_min;
            if (mid > (double)hist_max) mid = (double)hist_max;
            return mid;
        }
    }
    return (double)hist_max;
}

/* ---- connection ---- */
static int sock_fd = -1;
static struct vu_reader rd;

static uint8_t *read_reply(const char *what)
{
    uint8_t *m;
    const char *err = "";
    ssize_t n = vu_read_msg(&rd, &m, &err);
    if (n == 0) die("server closed the connection while waiting for the %s reply", what);
    if (n < 0) die("reading the %s reply: %s", what, err);
    return m;
}

/* Common reply checks: Type = reply, command, msg_id, no Error flag. */
static void check_reply_hdr(const uint8_t *m, uint16_t id, uint16_t cmd, const char *what)
{
    uint32_t flags = vu_get32(m + 8);
    if ((flags & VU_FLAG_TYPE_MASK) != VU_FLAG_TYPE_REPLY)
        die("%s: expected a reply, got a message with flags 0x%x (command %u, msg_id %u)",
            what, flags, vu_get16(m + 2), vu_get16(m));
    if (vu_get16(m + 2) != cmd)
        die("%s: reply has command %u, expected %u", what, vu_get16(m + 2), cmd);
    if (vu_get16(m) != id)
        die("%s: reply has msg_id %u, expected %u", what, vu_get16(m), id);
    if (flags & VU_FLAG_ERROR) {
        uint32_t e = vu_get32(m + 12);
        die("%s: server replied with error %u (%s)", what, e, strerror(e ? (int)e : EINVAL));
    }
}

static void do_version(void)
{
    uint8_t req[16 + 4 + sizeof VERSION_JSON]; /* sizeof includes the NUL */
    uint32_t size = (uint32_t)sizeof req;
    vu_put_hdr(req, 0, VU_CMD_VERSION, size, VU_FLAG_TYPE_COMMAND, 0);
    vu_put16(req + 16, 0); /* major */
    vu_put16(req + 18, 0); /* minor */
    memcpy(req + 20, VERSION_JSON, sizeof VERSION_JSON);
    if (vu_send_all(sock_fd, req, size) < 0) die("sending VERSION: %s", strerror(errno));

    uint8_t *m = read_reply("VERSION");
    uint32_t rsize = vu_get32(m + 4);
    check_reply_hdr(m, 0, VU_CMD_VERSION, "VERSION");
    if (rsize > size)
        die("VERSION: reply is %u bytes, longer than the %u-byte request (QEMU rejects that)",
            rsize, size);
    if (rsize < 20) die("VERSION: reply of %u bytes has no major/minor", rsize);
    if (vu_get16(m + 16) != 0) die("VERSION: server answered major %u, expected 0", vu_get16(m + 16));
    if (vu_get16(m + 18) != 0) die("VERSION: server answered minor %u, expected 0", vu_get16(m + 18));
    if (rsize > 20) {
        if (m[rsize - 1] != 0) die("VERSION: reply JSON is not NUL-terminated");
        if (m[20] != '{') die("VERSION: reply JSON is not an object");
    }
}

static uint32_t do_device_get_info(void)
{
    uint8_t req[32];
    vu_put_hdr(req, 1, VU_CMD_DEVICE_GET_INFO, 32, VU_FLAG_TYPE_COMMAND, 0);
    vu_put32(req + 16, 16); /* argsz */
    vu_put32(req + 20, 0);
    vu_put32(req + 24, 0);
    vu_put32(req + 28, 0);
    if (vu_send_all(sock_fd, req, sizeof req) < 0) die("sending DEVICE_GET_INFO: %s", strerror(errno));
    uint8_t *m = read_reply("DEVICE_GET_INFO");
    check_reply_hdr(m, 1, VU_CMD_DEVICE_GET_INFO, "DEVICE_GET_INFO");
    if (vu_get32(m + 4) != 32)
        die("DEVICE_GET_INFO: reply is %u bytes, expected 32", vu_get32(m + 4));
    if (vu_get32(m + 16) < 16) die("DEVICE_GET_INFO: reply argsz %u < 16", vu_get32(m + 16));
    return vu_get32(m + 24); /* num_regions */
}

/* ---- REGION_READ loop ---- */
static uint8_t rr_req[32];
static uint64_t opt_offset;
static uint32_t opt_region = 7, opt_count = 4;
static uint64_t seq = 2; /* msg_id = seq & 0xffff; 0 and 1 were VERSION and GET_INFO */

static inline void send_read(void)
{
    vu_put16(rr_req, (uint16_t)seq);
    ssize_t n = send(sock_fd, rr_req, sizeof rr_req, MSG_NOSIGNAL);
    if (n != (ssize_t)sizeof rr_req) {
        if (n >= 0 || errno == EINTR) { /* finish a short send (not expected) */
            size_t done = n > 0 ? (size_t)n : 0;
            if (vu_send_all(sock_fd, rr_req + done, sizeof rr_req - done) == 0) goto sent;
        }
        die("sending REGION_READ: %s", strerror(errno));
    }
sent:
    seq++;
}

static inline void recv_read(uint16_t id)
{
    uint8_t *m = read_reply("REGION_READ");
    uint32_t flags = vu_get32(m + 8);
    /* fast path: everything as expected */
    if (__builtin_expect((flags & (VU_FLAG_TYPE_MASK | VU_FLAG_ERROR)) == VU_FLAG_TYPE_REPLY &&
                         vu_get16(m) == id && vu_get16(m + 2) == VU_CMD_REGION_READ &&
                         vu_get32(m + 4) == 32 + opt_count && vu_get64(m + 16) == opt_offset &&
                         vu_get32(m + 24) == opt_region && vu_get32(m + 28) == opt_count, 1))
        return;
    check_reply_hdr(m, id, VU_CMD_REGION_READ, "REGION_READ");
    if (vu_get32(m + 4) != 32 + opt_count)
        die("REGION_READ: reply msg_size %u, expected %u (16 + 16 + count %u)",
            vu_get32(m + 4), 32 + opt_count, opt_count);
    die("REGION_READ: reply echo (offset %llu, region %u, count %u) does not match the request "
        "(offset %llu, region %u, count %u)",
        (unsigned long long)vu_get64(m + 16), vu_get32(m + 24), vu_get32(m + 28),
        (unsigned long long)opt_offset, opt_region, opt_count);
}

/*
 * Run round trips with `pipeline` outstanding until `limit` replies (limit > 0) or
 * until `deadline` (ns, monotonic) has passed; then drain. Returns replies received;
 * *t_end = time of the last reply. Latencies go into the histogram when record != 0.
 */
static uint64_t send_ts[MAX_PIPELINE];

static uint64_t run(unsigned pipeline, uint64_t limit, uint64_t deadline, int record,
                    uint64_t *t_end)
{
    uint64_t done = 0, sent = 0, t = now_ns();
    if (pipeline == 1) {
        for (;;) {
            uint16_t id = (uint16_t)seq;
            send_read();
            recv_read(id);
            uint64_t t2 = now_ns();
            if (record) hist_add(t2 - t);
            t = t2;
            done++;
            if (limit ? done >= limit : t >= deadline) break;
        }
        *t_end = t;
        return done;
    }
    uint64_t first = seq; /* sequence number of the oldest outstanding request */
    int sending = 1;
    while (sent < pipeline && (!limit || sent < limit)) {
        send_ts[seq % pipeline] = t;
        send_read();
        sent++;
    }
    while (done < sent) {
        recv_read((uint16_t)first);
        t = now_ns();
        if (record) hist_add(t - send_ts[first % pipeline]);
        first++;
        done++;
        if (sending && (limit ? sent >= limit : t >= deadline)) sending = 0;
        if (sending) {
            send_ts[seq % pipeline] = t;
            send_read();
            sent++;
        }
    }
    *t_end = t;
    return done;
}

static void usage(void)
{
    fprintf(stderr,
            "usage: vu_client SOCKET --seconds S [--region 7] [--offset 0] [--count 4]\n"
            "                 [--warmup N] [--pipeline N] [--no-info] [--json]\n");
    exit(2);
}

static unsigned long long num_arg(const char *name, const char *v, unsigned long long max)
{
    char *end;
    if (!v) usage();
    errno = 0;
    unsigned long long x = strtoull(v, &end, 0);
    if (errno || *end || end == v || v[0] == '-' || x > max) die("bad value for %s: '%s'", name, v);
    return x;
}

int main(int argc, char **argv)
{
    const char *path = NULL;
    double seconds = -1;
    uint64_t warmup = 10000;
    unsigned pipeline = 1;
    int json = 0, info = 1;

    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--seconds")) {
            char *end;
            if (!v) usage();
            seconds = strtod(v, &end);
            if (*end || end == v || !(seconds > 0) || seconds > 1e6) die("bad value for --seconds: '%s'", v);
            i++;
        } else if (!strcmp(a, "--region")) { opt_region = (uint32_t)num_arg(a, v, UINT32_MAX); i++; }
        else if (!strcmp(a, "--offset")) { opt_offset = num_arg(a, v, UINT64_MAX); i++; }
        else if (!strcmp(a, "--count")) { opt_count = (uint32_t)num_arg(a, v, VU_MAX_DATA_XFER); i++; }
        else if (!strcmp(a, "--warmup")) { warmup = num_arg(a, v, UINT64_MAX); i++; }
        else if (!strcmp(a, "--pipeline")) {
            pipeline = (unsigned)num_arg(a, v, MAX_PIPELINE);
            if (pipeline == 0) die("--pipeline must be >= 1");
            i++;
        } else if (!strcmp(a, "--json")) json = 1;
        else if (!strcmp(a, "--no-info")) info = 0;
        else if (!strcmp(a, "-h") || !strcmp(a, "--help")) usage();
        else if (a[0] == '-' || path) die("unexpected argument '%s'", a);
        else path = a;
    }
    if (!path || seconds < 0) usage();
    if (opt_count == 0)
        die("--count 0 is not supported (servers may answer with a bare header)");

    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    if (strlen(path) >= sizeof sa.sun_path) die("socket path too long: %s", path);
    strcpy(sa.sun_path, path);
    sock_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (sock_fd < 0) die("socket: %s", strerror(errno));
    if (connect(sock_fd, (struct sockaddr *)&sa, sizeof sa) < 0)
        die("connect %s: %s", path, strerror(errno));
    if (vu_reader_init(&rd, sock_fd, 2 * ((size_t)32 + opt_count) + 256 * 1024) < 0)
        die("out of memory");

    do_version();
    uint32_t num_regions = 0;
    if (info) {
        num_regions = do_device_get_info();
        if (opt_region >= num_regions)
            die("region %u does not exist (DEVICE_GET_INFO reports %u regions)", opt_region, num_regions);
    }

    vu_put_hdr(rr_req, 0, VU_CMD_REGION_READ, 32, VU_FLAG_TYPE_COMMAND, 0);
    vu_put64(rr_req + 16, opt_offset);
    vu_put32(rr_req + 24, opt_region);
    vu_put32(rr_req + 28, opt_count);

    uint64_t t_end;
    if (warmup) run(pipeline, warmup, 0, 0, &t_end);
    uint64_t t0 = now_ns();
    uint64_t n = run(pipeline, 0, t0 + (uint64_t)(seconds * 1e9), 1, &t_end);
    double secs = (double)(t_end - t0) / 1e9;
    double rps = (double)n / secs, us_per = secs * 1e6 / (double)n;
    double p50 = hist_quantile(0.50) / 1e3, p99 = hist_quantile(0.99) / 1e3;
    double p999 = hist_quantile(0.999) / 1e3;
    double mean = (double)hist_sum / (double)hist_n / 1e3;
    close(sock_fd);

    if (json) {
        printf("{\"roundTrips\":%llu,\"seconds\":%.6f,\"roundTripsPerSec\":%.0f,"
               "\"usPerRoundTrip\":%.4f,\"p50Us\":%.3f,\"p99Us\":%.3f,\"p999Us\":%.3f,"
               "\"minUs\":%.3f,\"maxUs\":%.3f,\"meanUs\":%.3f,\"pipeline\":%u,\"region\":%u,"
               "\"offset\":%llu,\"count\":%u,\"warmup\":%llu,\"numRegions\":%u}\n",
               (unsigned long long)n, secs, rps, us_per, p50, p99, p999,
               (double)hist_min / 1e3, (double)hist_max / 1e3, mean, pipeline, opt_region,
               (unsigned long long)opt_offset, opt_count, (unsigned long long)warmup, num_regions);
    } else {
        printf("%llu round trips in %.3f s: %.0f/s, %.3f us each; latency p50 %.3f us, "
               "p99 %.3f us, p99.9 %.3f us, min %.3f us, max %.3f us (pipeline %u)\n",
               (unsigned long long)n, secs, rps, us_per, p50, p99, p999,
               (double)hist_min / 1e3, (double)hist_max / 1e3, pipeline);
    }
    return 0;
}

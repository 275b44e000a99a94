/* A stand-in libnvidia-ml.so.1 for the daemon benchmarks: 8 loaded H100s behind NVML's C ABI.
 *
 * The real nvidia-ml-py (pynvml) loads it through LD_LIBRARY_PATH, so a benchmarked daemon runs
 * tally, pynvml and ctypes exactly as on a GPU node, with only the driver replaced by functions
 * that answer at once. The Python stand-in (tests.support.nvml) answers the same values, but its
 * fault-injection bookkeeping costs more per call than pynvml itself, and it would be measured
 * as the daemon's.
 *
 * Values are those of tests/support/nvml/profiles.py H100_LOADED (an H100 80GB HBM3 under
 * gpu_burn): 100 % utilisation, 629.45 W, 59 C, three processes, GPM supported. Energy grows
 * with the power over CLOCK_MONOTONIC. Only what tally's daemon calls is here; any other symbol
 * is missing, which pynvml reports as NVML_ERROR_FUNCTION_NOT_FOUND.
 *
 * Layouts are nvml.h's; the static asserts hold them to the sizes of nvidia-ml-py's ctypes
 * structures, and tests/test_driver_stub.py to the Python stand-in's answers.
 */
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#define GPUS 8
#define NVML_SUCCESS 0
#define NVML_ERROR_INVALID_ARGUMENT 2
#define NVML_ERROR_NOT_SUPPORTED 3
#define NVML_ERROR_INSUFFICIENT_SIZE 7
#define NVML_ERROR_TIMEOUT 10
#define NVML_ERROR_ARGUMENT_VERSION_MISMATCH 25

#define MIB (1024ULL * 1024ULL)
#define MEMORY_TOTAL (81559ULL * MIB)
#define MEMORY_RESERVED (479ULL * MIB)
#define MEMORY_USED (19818ULL * MIB)
#define POWER_MW 629450u
#define SM_UTIL_PCT 100.0

typedef struct { unsigned int index; } device_t;
typedef device_t *nvmlDevice_t;

typedef struct { unsigned int gpu, memory; } nvmlUtilization_t;
typedef struct {
    unsigned int version;
    unsigned long long total, reserved, free, used;
} nvmlMemory_v2_t;
typedef struct {
    unsigned int fieldId, scopeId;
    long long timestamp, latencyUsec;
    unsigned int valueType, nvmlReturn;
    union { double dVal; unsigned int uiVal; unsigned long long ullVal; } value;
} nvmlFieldValue_t;
typedef struct {
    unsigned int pid;
    unsigned long long usedGpuMemory;
    unsigned int gpuInstanceId, computeInstanceId;
} nvmlProcessInfo_t;
typedef struct {
    unsigned int pid;
    unsigned long long timeStamp;
    unsigned int smUtil, memUtil, encUtil, decUtil;
} nvmlProcessUtilizationSample_t;
typedef struct { unsigned int version, sensorType; int temperature; } nvmlTemperature_t;
typedef struct { unsigned int version, isSupportedDevice; } nvmlGpmSupport_t;
typedef struct { unsigned long long taken_us; } gpm_sample_t;
typedef struct {
    unsigned int metricId, nvmlReturn;
    double value;
    const char *shortName, *longName, *unit;
} nvmlGpmMetric_t;
typedef struct {
    unsigned int version, numMetrics;
    gpm_sample_t *sample1, *sample2;
    nvmlGpmMetric_t metrics[477];
} nvmlGpmMetricsGet_t;
typedef struct {
    nvmlDevice_t device;
    unsigned long long eventType, eventData;
    unsigned int gpuInstanceId, computeInstanceId;
} nvmlEventData_t;

_Static_assert(sizeof(nvmlFieldValue_t) == 40, "nvmlFieldValue_t");
_Static_assert(sizeof(nvmlMemory_v2_t) == 40, "nvmlMemory_v2_t");
_Static_assert(sizeof(nvmlProcessInfo_t) == 24, "nvmlProcessInfo_v2_t");
_Static_assert(sizeof(nvmlProcessUtilizationSample_t) == 32, "nvmlProcessUtilizationSample_t");
_Static_assert(sizeof(nvmlTemperature_t) == 12, "nvmlTemperature_v1_t");
_Static_assert(sizeof(nvmlGpmMetricsGet_t) == 19104, "nvmlGpmMetricsGet_t");
_Static_assert(sizeof(nvmlEventData_t) == 32, "nvmlEventData_t");

static device_t devices[GPUS] = {{0}, {1}, {2}, {3}, {4}, {5}, {6}, {7}};
static gpm_sample_t gpm_samples[4 * GPUS];
static unsigned char gpm_in_use[4 * GPUS];
static int event_set;
static unsigned long long started_us;

static unsigned long long now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (unsigned long long)ts.tv_sec * 1000000ULL + (unsigned long long)ts.tv_nsec / 1000ULL;
}

static int valid(nvmlDevice_t device) {
    uintptr_t at = (uintptr_t)device, first = (uintptr_t)devices;
    return at >= first && at < first + sizeof(devices) && (at - first) % sizeof(device_t) == 0;
}

const char *nvmlErrorString(int result) {
    switch (result) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
    case NVML_ERROR_TIMEOUT: return "Timeout";
    default: return "Unknown Error";
    }
}

int nvmlInitWithFlags(unsigned int flags) {
    (void)flags;
    if (!started_us) started_us = now_us();
    return NVML_SUCCESS;
}
int nvmlInit_v2(void) { return nvmlInitWithFlags(0); }
int nvmlShutdown(void) { return NVML_SUCCESS; }

int nvmlDeviceGetCount_v2(unsigned int *count) {
    *count = GPUS;
    return NVML_SUCCESS;
}

int nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
    if (index >= GPUS) return NVML_ERROR_INVALID_ARGUMENT;
    *device = &devices[index];
    return NVML_SUCCESS;
}

int nvmlDeviceGetIndex(nvmlDevice_t device, unsigned int *index) {
    if (!valid(device)) return NVML_ERROR_INVALID_ARGUMENT;
    *index = device->index;
    return NVML_SUCCESS;
}

int nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length) {
    if (!valid(device)) return NVML_ERROR_INVALID_ARGUMENT;
    if (length < 41) return NVML_ERROR_INSUFFICIENT_SIZE;
    snprintf(uuid, length, "GPU-00000000-0000-0000-0000-%012x", device->index);
    return NVML_SUCCESS;
}

int nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length) {
    if (!valid(device)) return NVML_ERROR_INVALID_ARGUMENT;
    if (length < 22) return NVML_ERROR_INSUFFICIENT_SIZE;
    snprintf(name, length, "NVIDIA H100 80GB HBM3");
    return NVML_SUCCESS;
}

int nvmlDeviceGetMigMode(nvmlDevice_t device, unsigned int *current, unsigned int *pending) {
    if (!valid(device)) return NVML_ERROR_INVALID_ARGUMENT;
    *current = *pending = 0;
    return NVML_SUCCESS;
}

static unsigned long long energy_mj(void) {
    /* mW times µs is nJ: a million of them is a millijoule */
    return 4200000000ULL + (now_us() - started_us) * POWER_MW / 1000000ULL;
}

int nvmlDeviceGetTotalEnergyConsumption(nvmlDevice_t device, unsigned long long *energy) {
    if (!valid(device)) return NVML_ERROR_INVALID_ARGUMENT;
    *energy = energy_mj();
    return NVML_SUCCESS;
}

int nvmlDeviceGetFieldValues(nvmlDevice_t device, int count, nvmlFieldValue_t *values) {
    if (!valid(device)) return NVML_ERROR_INVALID_ARGUMENT;
    unsigned long long now = now_us();
    for (int i = 0; i < count; i++) {
        nvmlFieldValue_t *v = &values[i];
        v->timestamp = (long long)now;
        v->latencyUsec = 0;
        v->nvmlReturn = NVML_SUCCESS;
        v->valueType = 3; /* unsigned long long */
        switch (v->fieldId) {
        case 83: v->value.ullVal = energy_mj(); break; /* TOTAL_ENERGY_CONSUMPTION */
        case 3: v->value.ullVal = 0; break;             /* ECC_SBE_VOL_TOTAL */
        case 4: v->value.ullVal = 0; break;             /* ECC_DBE_VOL_TOTAL */
        case 144: v->valueType = 1; v->value.uiVal = 0; break; /* REMAPPED_PENDING */
        default: v->nvmlReturn = NVML_ERROR_NOT_SUPPORTED; v->value.ullVal = 0;
        }
    }
    return NVML_SUCCESS;
}

int nvmlDeviceGetUtilizationRates(nvmlDevice_t device, nvmlUtilization_t *utilization) {
    if (!valid(device)) return NVML_ERROR_INVALID_ARGUMENT;
    utilization->gpu = 100;
    utilization->memory = 11;
    return NVML_SUCCESS;
}

int nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *memory) {
    if (!valid(device)) return NVML_ERROR_INVALID_ARGUMENT;
    if (memory->version != ((unsigned int)sizeof(nvmlMemory_v2_t) | (2u << 24)))
        return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    memory->total = MEMORY_TOTAL;
    memory->reserved = MEMORY_RESERVED;
    memory->used = MEMORY_USED;
    memory->free = MEMORY_TOTAL - MEMORY_RESERVED - MEMORY_USED;
    return NVML_SUCCESS;
}

int nvmlDeviceGetPowerUsage(nvmlDevice_t device, unsigned int *power) {
    if (!valid(device)) return NVML_ERROR_INVALID_ARGUMENT;
    *power = POWER_MW;
    return NVML_SUCCESS;
}

int nvmlDeviceGetTemperatureV(nvmlDevice_t device, nvmlTemperature_t *temperature) {
    if (!valid(device)) return NVML_ERROR_INVALID_ARGUMENT;
    if (temperature->version != ((unsigned int)sizeof(nvmlTemperature_t) | (1u << 24)))
        return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    if (temperature->sensorType != 0) return NVML_ERROR_NOT_SUPPORTED;
    temperature->temperature = 59;
    return NVML_SUCCESS;
}

int nvmlDeviceGetCurrentClocksEventReasons(nvmlDevice_t device, unsigned long long *reasons) {
    if (!valid(device)) return NVML_ERROR_INVALID_ARGUMENT;
    *reasons = 0;
    return NVML_SUCCESS;
}

static const nvmlProcessInfo_t processes[3] = {
    {11327, 2566 * MIB, 0xFFFFFFFF, 0xFFFFFFFF}, /* memhog */
    {11328, 1542 * MIB, 0xFFFFFFFF, 0xFFFFFFFF}, /* memhog */
    {11345, 15690 * MIB, 0xFFFFFFFF, 0xFFFFFFFF}, /* gpu_burn */
};

int nvmlDeviceGetComputeRunningProcesses_v3(
    nvmlDevice_t device, unsigned int *count, nvmlProcessInfo_t *infos) {
    if (!valid(device)) return NVML_ERROR_INVALID_ARGUMENT;
    if (infos == NULL || *count < 3) {
        *count = 3;
        return NVML_ERROR_INSUFFICIENT_SIZE;
    }
    memcpy(infos, processes, sizeof(processes));
    *count = 3;
    return NVML_SUCCESS;
}

int nvmlDeviceGetProcessUtilization(nvmlDevice_t device, nvmlProcessUtilizationSample_t *samples,
                                    unsigned int *count, unsigned long long last_seen) {
    (void)last_seen; /* a sample is taken between any two calls a second apart */
    if (!valid(device)) return NVML_ERROR_INVALID_ARGUMENT;
    if (samples == NULL || *count < 1) {
        *count = 1;
        return NVML_ERROR_INSUFFICIENT_SIZE;
    }
    samples[0].pid = 11345;
    samples[0].timeStamp = now_us();
    samples[0].smUtil = 100;
    samples[0].memUtil = 11;
    samples[0].encUtil = samples[0].decUtil = 0;
    *count = 1;
    return NVML_SUCCESS;
}

int nvmlGpmQueryDeviceSupport(nvmlDevice_t device, nvmlGpmSupport_t *support) {
    if (!valid(device)) return NVML_ERROR_INVALID_ARGUMENT;
    support->isSupportedDevice = 1;
    return NVML_SUCCESS;
}

int nvmlGpmSampleAlloc(gpm_sample_t **sample) {
    for (unsigned int i = 0; i < 4 * GPUS; i++) {
        if (!gpm_in_use[i]) {
            gpm_in_use[i] = 1;
            *sample = &gpm_samples[i];
            return NVML_SUCCESS;
        }
    }
    return NVML_ERROR_INSUFFICIENT_SIZE;
}

int nvmlGpmSampleFree(gpm_sample_t *sample) {
    uintptr_t at = (uintptr_t)sample, first = (uintptr_t)gpm_samples;
    if (at < first || at >= first + sizeof(gpm_samples)) return NVML_ERROR_INVALID_ARGUMENT;
    gpm_in_use[(at - first) / sizeof(gpm_sample_t)] = 0;
    return NVML_SUCCESS;
}

int nvmlGpmSampleGet(nvmlDevice_t device, gpm_sample_t *sample) {
    if (!valid(device) || sample == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    sample->taken_us = now_us();
    return NVML_SUCCESS;
}

int nvmlGpmMetricsGet(nvmlGpmMetricsGet_t *request) {
    if (request->sample1 == NULL || request->sample2 == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    for (unsigned int i = 0; i < request->numMetrics && i < 477; i++) {
        int sm_util = request->metrics[i].metricId == 2; /* NVML_GPM_METRIC_SM_UTIL */
        request->metrics[i].nvmlReturn = sm_util ? NVML_SUCCESS : NVML_ERROR_NOT_SUPPORTED;
        request->metrics[i].value = sm_util ? SM_UTIL_PCT : 0.0;
    }
    return NVML_SUCCESS;
}

int nvmlEventSetCreate(void **set) {
    *set = &event_set;
    return NVML_SUCCESS;
}

int nvmlDeviceRegisterEvents(nvmlDevice_t device, unsigned long long types, void *set) {
    (void)types;
    (void)set;
    return valid(device) ? NVML_SUCCESS : NVML_ERROR_INVALID_ARGUMENT;
}

int nvmlEventSetWait_v2(void *set, nvmlEventData_t *data, unsigned int timeout_ms) {
    (void)set;
    (void)data;
    (void)timeout_ms;
    return NVML_ERROR_TIMEOUT; /* no XID pending */
}

int nvmlEventSetFree(void *set) {
    (void)set;
    return NVML_SUCCESS;
}

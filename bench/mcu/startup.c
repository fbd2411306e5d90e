/* Minimal Cortex-M start for QEMU's mps2-an386 (Cortex-M4): vector table, .data/.bss set-up,
 * then newlib's semihosting (rdimon) and main. */
#include <stdint.h>
#include <stdlib.h>

extern uint32_t __data_load, __data_start, __data_end, __bss_start__, __bss_end__, __stack_top;
extern void initialise_monitor_handles(void);
extern int main(void);

void reset_handler(void)
{
    uint32_t *src = &__data_load, *dst = &__data_start;
    while (dst < &__data_end) *dst++ = *src++;
    for (dst = &__bss_start__; dst < &__bss_end__;) *dst++ = 0;
    *(volatile uint32_t *)0xE000ED88 |= 0xFu << 20; /* CPACR: enable the FPU (CP10, CP11) */
    __asm volatile("dsb\n isb");
    initialise_monitor_handles();
    exit(main());
}

static void hang(void)
{
    for (;;) {}
}

__attribute__((section(".vectors"), used))
const void *vectors[16] = {&__stack_top, (void *)reset_handler, (void *)hang, (void *)hang, (void *)hang,
                           (void *)hang, (void *)hang, 0, 0, 0, 0, (void *)hang, (void *)hang, 0, (void *)hang,
                           (void *)hang};

void _init(void) {} /* no C++ constructors or destructors to run */
void _fini(void) {}

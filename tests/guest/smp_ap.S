/* Multiboot guest that starts the second vCPU the way an OS does: it copies a real-mode
 * trampoline to 0x8000, sends INIT and STARTUP IPIs to APIC id 1 through the in-kernel LAPIC,
 * and waits for the AP to write a flag. Exit status 2*0x13+1 = 39 on success, 255 on timeout. */
#include "boot_common.inc"
	.set FLAG, 0x7000
	.set TRAMP, 0x8000
	.set LAPIC, 0xFEE00000
	MULTIBOOT_HEADER

	.text
	.code32
	.globl _start
_start:
	movl $0x90000, %esp
	movl $0, FLAG
	movl $ap_start, %esi
	movl $TRAMP, %edi
	movl $(ap_end - ap_start), %ecx
	rep movsb
	movl $(1 << 24), LAPIC + 0x310       /* ICR high: destination APIC id 1 */
	movl $0x00004500, LAPIC + 0x300      /* INIT, assert */
	movl $(1 << 24), LAPIC + 0x310
	movl $0x00004600 | (TRAMP >> 12), LAPIC + 0x300   /* STARTUP, vector 0x08 */
	movl $20000000, %ecx
1:	cmpl $0x600DC0DE, FLAG
	je ok
	pause
	loop 1b
	movl $timeout, %esi
	PUTS
	DEBUG_EXIT 0x7f
ok:
	movl $msg, %esi
	PUTS
	DEBUG_EXIT 0x13
	hlt

	.code16
ap_start:
	xorw %ax, %ax
	movw %ax, %ds
	movl $0x600DC0DE, FLAG
2:	cli
	hlt
	jmp 2b
ap_end:

	.section .rodata
msg:	.asciz "SMP AP started\n"
timeout: .asciz "SMP AP did not start\n"

/* Multiboot guest that starts every AP at once, as Linux's smpboot may: INIT and STARTUP IPIs
 * to "all excluding self". The command line's first character is the number of CPUs N (2..8).
 * Each AP, in its real-mode trampoline, sets bit <initial APIC id from CPUID.1:EBX[31:24]> in
 * MASK and counts itself in COUNT. The BSP waits for N-1 APs, checks that MASK holds exactly
 * ids 1..N-1 (each AP ran once, with its own id) and prints them. Exit status 2*0x15+1 = 43
 * on success; 255 (0x7f) with what it saw otherwise. */
#include "boot_common.inc"
	.set COUNT, 0x7000
	.set MASK, 0x7004
	.set TRAMP, 0x8000
	.set LAPIC, 0xFEE00000
	MULTIBOOT_HEADER

	.text
	.code32
	.globl _start
_start:
	movl $0x90000, %esp
	movl $0, COUNT
	movl $0, MASK
	testl $4, (%ebx)               /* flags bit 2: cmdline valid */
	jz bad
	movl 16(%ebx), %esi
	movzbl (%esi), %ebp
	subl $0x30, %ebp               /* ebp = N, the CPUs expected */
	cmpl $2, %ebp
	jb bad
	cmpl $8, %ebp
	ja bad
	movl $ap_start, %esi
	movl $TRAMP, %edi
	movl $(ap_end - ap_start), %ecx
	rep movsb
	movl $0x000C4500, LAPIC + 0x300                 /* INIT, assert, all excluding self */
	movl $(0x000C4600 | (TRAMP >> 12)), LAPIC + 0x300  /* STARTUP, vector 0x08, all excluding self */
	movl %ebp, %edx
	decl %edx                      /* APs expected */
	movl $20000000, %ecx
wait:	cmpl %edx, COUNT
	jae counted
	pause
	loop wait
	movl $timeout, %esi
	PUTS
	call print_ids
	DEBUG_EXIT 0x7f
	hlt
counted:
	movl %ebp, %ecx
	movl $1, %eax
	shll %cl, %eax
	subl $2, %eax                  /* ids 1..N-1 */
	cmpl %eax, MASK
	jne wrong
	movl $ok, %esi
	PUTS
	call print_ids
	DEBUG_EXIT 0x15
	hlt
wrong:
	movl $badmask, %esi
	PUTS
	call print_ids
	DEBUG_EXIT 0x7f
	hlt
bad:
	movl $badcmd, %esi
	PUTS
	DEBUG_EXIT 0x7f
	hlt

/* " <id>" for each bit set in MASK (ids 0..9), then the count and a newline */
print_ids:
	movl $0, %ebx
next:	btl %ebx, MASK
	jnc skip
	movw $0x3f8, %dx
	movb $0x20, %al
	outb %al, %dx
	movb %bl, %al
	addb $0x30, %al
	outb %al, %dx
skip:	incl %ebx
	cmpl $10, %ebx
	jb next
	movl $count, %esi
	PUTS
	movw $0x3f8, %dx
	movl COUNT, %eax
	addb $0x30, %al
	outb %al, %dx
	movb $0x0a, %al
	outb %al, %dx
	ret

	.code16
ap_start:
	xorw %ax, %ax
	movw %ax, %ds
	movl $1, %eax
	cpuid
	shrl $24, %ebx                 /* initial APIC id */
	lock btsl %ebx, MASK
	lock incl COUNT
1:	cli
	hlt
	jmp 1b
ap_end:

	.section .rodata
ok:	.asciz "SMP APs up:"
badmask: .asciz "SMP AP ids wrong:"
timeout: .asciz "SMP APs missing:"
badcmd:	.asciz "SMP bad command line\n"
count:	.asciz " count="

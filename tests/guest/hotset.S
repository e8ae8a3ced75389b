/* Multiboot v1 ELF32 guest for the live-migration lost-write test (tests/tier1/test_migrate_hotset.py):
 * rewrites a hot set of HOT_PAGES pages (24 MiB at HOT) without pause and checks its own past.
 * Sweep s (s = 1, 2, ...; the last finished sweep is the dword at SWEEP) first checks that word 0
 * of page p still holds s-1, then stores s there and at a word that moves every sweep; SWEEP
 * becomes s once every page holds it. A page, or SWEEP, that comes back older after a migration
 * (a write the migration lost) prints "lost XXXXXXXX\n" (the page) and stops the guest at hlt.
 * Every 64 pages it also writes s into the next page of a 16 MiB journal (JOURNAL_PAGES pages at
 * JOURNAL, round robin): pages written once in a while, most of them clean at any one pass of the
 * migration, where every hot page is always dirty (a page the switchover's last log read misses
 * is then lost, which the hot set alone would not show).
 * Every 16 sweeps it prints "sweep XXXXXXXX\n" (s, hex). */
#include "boot_common.inc"
	MULTIBOOT_HEADER

	.set SWEEP, 0x300000
	.set HOT, 0x1000000
	.set HOT_PAGES, 6144
	.set JPOS, 0x300004
	.set JOURNAL, 0x2800000
	.set JOURNAL_PAGES, 4096
	.text
	.code32
	.globl _start
_start:
	movl $0x90000, %esp
	movl $hello, %esi
	PUTS
sweep:
	movl SWEEP, %ebx
	incl %ebx			/* s */
	leal -1(%ebx), %edi		/* what every page must hold */
	movl %ebx, %ebp
	andl $1022, %ebp
	leal 4(,%ebp,4), %ebp		/* the moving word's offset: 4..4092 */
	xorl %ecx, %ecx			/* page number */
	movl $HOT, %esi
page:
	cmpl %edi, (%esi)
	jne lost
	movl %ebx, (%esi)
	movl %ebx, (%esi,%ebp)
	testl $63, %ecx
	jnz 3f
	movl JPOS, %eax
	incl JPOS
	andl $(JOURNAL_PAGES - 1), %eax
	shll $12, %eax
	movl %ebx, JOURNAL(%eax)
3:	addl $4096, %esi
	incl %ecx
	cmpl $HOT_PAGES, %ecx
	jne page
	movl %ebx, SWEEP
	testl $15, %ebx
	jnz sweep
	movl $tick, %esi
	PUTS
	call hex
	jmp sweep

lost:
	movl %ecx, %ebx
	movl $lostmsg, %esi
	PUTS
	call hex
1:	cli
	hlt
	jmp 1b

/* %ebx as 8 hex digits and a newline on COM1 */
hex:
	movl $8, %ecx
2:	roll $4, %ebx
	movl %ebx, %eax
	andl $15, %eax
	movb digits(%eax), %al
	movw $0x3f8, %dx
	outb %al, %dx
	loop 2b
	movb $10, %al
	outb %al, %dx
	ret

	.section .rodata
hello:	.asciz "hotset guest\n"
tick:	.asciz "sweep "
lostmsg: .asciz "lost "
digits:	.ascii "0123456789abcdef"
